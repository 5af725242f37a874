"""Build an LLM that runs expert-parallel over a group of ranks.

    ep = init_ep()                                   # on every rank (launch.py or torchrun)
    llm = build_ep_llm(model_dir, ep, EPOptions(dispatcher="speculative", placement="p.yaml"))
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0))   # on every rank
    if ep.is_main: print(outs[0].outputs[0].text, llm.moe_stats())

Every rank must make the same calls with the same requests in the same order: the engine's
scheduler and sampler are deterministic given that (same seeds), so all ranks take the same
step, which the collectives inside every layer require (otherwise they hang).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from moe_rt.errors import MoeRtError
from parallel.apply import EPRuntime, apply_expert_parallel
from parallel.groups import EPGroup
from moe_rt_app.config import RuntimeConfig, build_config, load_expert_parallel
from parallel.placement import ExpertParallelPlacement, default_placement
from parallel.stats import merge_stats
from parallel.tp import shard_kv_cache
from router_predict.config import RESIDUAL_GATE, PredictorConfig


@dataclass(frozen=True)
class EPOptions:
    """How a model runs expert-parallel: the config tree's parallel, expert_parallel and predictor
    sections (from_config), or, for programs and tests, a ready Predictor object."""

    dispatcher: str = "alltoall"  # alltoall (baseline) or speculative (s-TS)
    placement: str | ExpertParallelPlacement | None = None  # YAML path, object, or None = default
    predictor: object = RESIDUAL_GATE  # s-TS: residual_gate, a name, a PredictorConfig or a Predictor
    slack: float = 0.25  # s-TS: tokens per rank <= ceil((1 + slack) * T / N)

    @classmethod
    def from_config(cls, cfg: RuntimeConfig) -> "EPOptions":
        p = cfg.parallel
        return cls(p.dispatcher, cfg.expert_parallel, cfg.predictor or RESIDUAL_GATE, p.slack)


def resolve_placement(placement, num_layers: int, num_experts: int, ranks: int) -> ExpertParallelPlacement:
    if placement is None:
        return default_placement(num_layers, num_experts, ranks)
    if isinstance(placement, (str, Path)):
        return load_expert_parallel(placement)
    return placement


def resolve_predictor(predictor, model_dir: str):
    if isinstance(predictor, PredictorConfig):
        name, predictor_dir = predictor.name, predictor.dir
    elif isinstance(predictor, str):
        name, predictor_dir = predictor, None
    else:  # None or a ready Predictor object
        return predictor
    if name == RESIDUAL_GATE:  # built from the model's own modules by apply_expert_parallel
        return name
    from router_predict.registry import build_predictor

    return build_predictor(name, model_dir=model_dir, predictor_dir=predictor_dir, depth=1)


class EPLLM:
    """The LLM API on one rank of an expert-parallel group (same calls on every rank)."""

    def __init__(self, llm, runtime: EPRuntime) -> None:
        self.llm, self.runtime = llm, runtime

    @property
    def ep(self) -> EPGroup:
        return self.runtime.ep

    @property
    def stats(self):
        return self.runtime.stats

    def generate(self, *args, **kwargs):
        return self.llm.generate(*args, **kwargs)

    def prompt_logits(self, token_ids):
        return self.llm.prompt_logits(token_ids)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def moe_stats(self, group_view: bool = False) -> dict:
        """This rank's counters, or (group_view=True, a collective: call on every rank) the merged view."""
        mine = self.runtime.moe_stats()
        if not group_view:
            return mine
        if self.ep.world == 1:
            return merge_stats([mine])
        every: list = [None] * self.ep.world
        dist.all_gather_object(every, mine, group=self.ep.group)
        return merge_stats(every)


def build_ep_llm(model_dir: str | Path, ep: EPGroup, options: EPOptions = EPOptions(), *,
                 progress: bool = False, **llm_options) -> EPLLM:
    """`LLM(model_dir, **llm_options)` on this rank, run expert-parallel as `options` say."""
    llm_options["device"] = str(llm_options.get("device", ep.device))  # another one: refused below
    return ep_llm_from_config(build_config(model=str(model_dir), **llm_options), ep, options, progress=progress)


def ep_llm_from_config(cfg: RuntimeConfig, ep: EPGroup, options: EPOptions | None = None, *,
                       progress: bool = False) -> EPLLM:
    """Build this rank's engine through the assembly point, then apply EP (attention TP + expert
    parallelism) to its model. options: default EPOptions.from_config(cfg)."""
    from moe_rt_app.llm import LLM

    if cfg.device not in ("auto", str(ep.device)):
        raise MoeRtError(f"device {cfg.device} differs from the group's {ep.device}")
    options = options or EPOptions.from_config(cfg)
    # NOTE: the engine loads every expert before EP drops the ones this rank does not hold; a
    # load_experts=False hook would avoid the peak (see docs/parallel.md).
    llm = LLM.from_config(cfg.model_copy(update={"device": str(ep.device)}), progress=progress)
    model = llm.engine.model
    spec = model.spec
    placement = resolve_placement(options.placement, len(spec.moe_layer_ids), spec.num_experts, ep.world)
    predictor = resolve_predictor(options.predictor, cfg.model) if options.dispatcher == "speculative" else None
    runtime = apply_expert_parallel(model, ep, placement, options.dispatcher, predictor,
                                    reader=llm.engine.reader, slack=options.slack)
    runner = llm.engine.runner
    runner.kv = shard_kv_cache(runner.kv, ep.world)
    return EPLLM(llm, runtime)
