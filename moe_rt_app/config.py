"""The config tree, validated once at start-up, and the one loader of its YAML file.

    RuntimeConfig
      model, dtype, device   which checkpoint, in which numerics, where  (moe_rt.config.ModelConfig)
      engine                 batching, KV cache, expert compute          (moe_rt.config.EngineConfig)
      cache                  the expert cache                            (expert_cache.config.CacheConfig)
      predictor              the one routing predictor                   (router_predict.config.PredictorConfig)
      parallel               expert-parallel ranks and dispatcher        (parallel.config.ParallelConfig)
      expert_parallel        which rank holds which expert               (parallel.placement.ExpertParallelPlacement)
      server                 the HTTP server                             (server.config.ServerConfig)

Each package owns its section's type; the tree is composed here, the one layer that sees every
package, and so are the rules that span sections (a predictive cache needs the predictor section;
expert parallelism does not run under an expert cache). One YAML file holds any subset of the
sections (docs/placement.md): the expert-placement file is that file, read by `load_config_file`
whether it is named by `--config`, `--placement` or `LLM(placement=...)`.

Values discovered at start-up (KV blocks, max_model_len after the budget, cache slots) live in the
running parts, never written back here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from expert_cache.config import CacheConfig
from moe_rt.config import EngineConfig, ModelConfig
from moe_rt.errors import MoeRtError, validation_detail
from moe_rt.yaml_file import read_yaml_file
from parallel.config import ParallelConfig
from parallel.placement import ExpertParallelPlacement
from router_predict.config import RESIDUAL_GATE, PredictorConfig
from server.config import ServerConfig

SCALARS = ("model", "dtype", "device")
SECTIONS = ("engine", "cache", "predictor", "parallel", "expert_parallel", "server")
# A cache section may still name its predictor (the layout before the predictor section existed):
# the loader lifts these keys into the predictor section.
CACHE_PREDICTOR_KEYS = {"predictor": "name", "predictor_dir": "dir"}


class RuntimeConfig(BaseModel):
    """Everything `LLM(...)`, the CLI and the server need."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(description="Hugging Face checkpoint folder")
    dtype: str = Field("auto", description="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="batching, KV cache, expert compute")
    cache: CacheConfig | None = Field(None, description="the expert cache (docs/placement.md); none: every expert resident")
    predictor: PredictorConfig | None = Field(
        None, description="the routing predictor: prefetch for a predictive cache, speculative token "
                          "shuffling, and its live recall in moe_stats")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="expert-parallel ranks")
    expert_parallel: ExpertParallelPlacement | None = Field(
        None, description="expert-to-rank placement (default: contiguous blocks of experts per rank)")
    server: ServerConfig = Field(default_factory=ServerConfig, description="the HTTP server")

    @model_validator(mode="after")
    def _across_sections(self) -> "RuntimeConfig":
        if self.cache is not None and self.cache.policy == "predictive" and self.predictor is None:
            raise ValueError("cache policy predictive needs a predictor (the predictor section, or --predictor)")
        ep = self.parallel.ep
        if ep > 1 and self.offload:
            raise ValueError("expert parallelism (parallel.ep > 1) does not combine with an expert cache yet; "
                             "remove the cache section or run on one rank")
        if self.predictor is not None and self.predictor.name == RESIDUAL_GATE and (
                ep == 1 or self.parallel.dispatcher != "speculative"):
            raise ValueError(f"predictor {RESIDUAL_GATE} exists only for expert parallelism's speculative "
                             "dispatcher (parallel.ep > 1, dispatcher speculative)")
        if ep > 1 and self.predictor is not None and self.parallel.dispatcher != "speculative":
            raise ValueError("under expert parallelism a predictor is used only by the speculative "
                             "dispatcher; set parallel.dispatcher speculative or remove the predictor")
        if ep > 1 and self.engine.scheduler_policy != "fcfs":
            # every rank must decode the same sequences each step or the all-to-all hangs
            raise ValueError("scheduler_policy expert_aware runs on one rank; use fcfs under expert "
                             "parallelism (parallel.ep > 1)")
        if self.engine.expert_bits_plan is not None and self.engine.expert_compute not in ("torch", "reference"):
            raise ValueError(f"expert_bits_plan runs on expert_compute torch or reference, not "
                             f"{self.engine.expert_compute}")
        if self.engine.compile and ep > 1:  # the EP layer driver is each layer's forward; the compiled layers would go around it
            raise ValueError("compile runs on one rank; drop it under expert parallelism (parallel.ep > 1)")
        if self.engine.cuda_graphs:  # a captured step cannot wait on a collective, a cache or a predictor
            if ep > 1:
                raise ValueError("cuda_graphs runs on one rank; drop it under expert parallelism (parallel.ep > 1)")
            if self.offload:
                raise ValueError("cuda_graphs does not combine with an expert cache, whose resident experts "
                                 "change step by step; remove the cache section or cuda_graphs")
            if self.predictor is not None:
                raise ValueError("cuda_graphs does not combine with a predictor, which reads every step's "
                                 "routing on the host; remove the predictor or cuda_graphs")
        if self.expert_parallel is not None and ep > 1 and self.expert_parallel.ranks != ep:
            raise ValueError(f"expert_parallel is for {self.expert_parallel.ranks} ranks but parallel.ep is {ep}")
        return self

    def model_section(self) -> ModelConfig:
        return ModelConfig(model=self.model, dtype=self.dtype, device=self.device)

    @property
    def offload(self) -> bool:
        """True when routed experts live outside the compute device, behind an expert cache."""
        return self.cache is not None and self.cache.offload != "none"

    def check_model(self, num_moe_layers: int, num_experts: int) -> None:
        """The checks that need the model: pinned and placed expert ids in range."""
        if self.cache is not None:
            self.cache.check_model(num_moe_layers, num_experts)
        if self.expert_parallel is not None:
            self.expert_parallel.validate_against(num_moe_layers, num_experts)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a config (or expert-placement) YAML file as plain data, structure-checked;
    build_config validates them with everything else, once. Problems are one line."""
    doc = read_yaml_file(path, "config file")
    if doc is None:
        doc = {}
    keys = ", ".join(SCALARS + SECTIONS)
    if not isinstance(doc, dict):
        raise MoeRtError(f"config file {path} must be a mapping with keys {keys}")
    unknown = sorted(str(k) for k in set(doc) - set(SCALARS + SECTIONS))
    if unknown:
        raise MoeRtError(f"config file {path}: unknown section '{unknown[0]}' (expected {keys})")
    for name in SECTIONS:
        if name in doc and doc[name] is None:
            doc[name] = {}
        if name in doc and not isinstance(doc[name], dict):
            raise MoeRtError(f"config file {path}: {name}: must be a mapping, got {type(doc[name]).__name__}")
    return lift_cache_predictor(doc, f"config file {path}")


def lift_cache_predictor(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """Move a cache section's `predictor`/`predictor_dir` keys into the predictor section."""
    cache = doc.get("cache")
    if not isinstance(cache, dict) or not set(CACHE_PREDICTOR_KEYS) & set(cache):
        return doc
    cache = dict(cache)
    lifted = {field: cache.pop(key) for key, field in CACHE_PREDICTOR_KEYS.items() if key in cache}
    given = doc.get("predictor")
    if isinstance(given, BaseModel):
        given = given.model_dump(exclude_defaults=True)
    if given and any(f in given and given[f] != v for f, v in lifted.items()):
        raise MoeRtError(f"{where}: the cache section names predictor {lifted.get('name')!r} but the "
                         f"predictor section names {given.get('name')!r}; keep one")
    return {**doc, "cache": cache, "predictor": {**lifted, **(given or {})}}


def build_config(*, placement: str | None = None, config: str | None = None, **options) -> RuntimeConfig:
    """The validated tree from a YAML file (`config`, or its older name `placement`) and options
    that override it: model/dtype/device; engine fields by name (max_num_seqs=16); sections as
    objects or mappings (cache={...}, predictor={...}). predictor="NAME" (with predictor_dir and
    predictor_depth) is the predictor section spelled flat."""
    if placement is not None and config is not None and placement != config:
        raise MoeRtError("give the config file once: config or placement, not both")
    path = config or placement
    doc = load_config_file(path) if path else {}
    engine = {k: options.pop(k) for k in list(options) if k in EngineConfig.model_fields}
    flat = {k: options.pop(k, None) for k in ("predictor_dir", "predictor_depth")}
    if isinstance(options.get("predictor"), str):
        options["predictor"] = {"name": options["predictor"], "dir": flat["predictor_dir"],
                                "depth": flat["predictor_depth"] or 1}
    elif any(v is not None for v in flat.values()):
        raise MoeRtError("invalid option predictor_dir/predictor_depth: they need predictor=NAME")
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**doc, **given}
    if engine:
        base = merged.get("engine") or {}
        merged["engine"] = {**(base.model_dump() if isinstance(base, BaseModel) else base), **engine}
    merged = lift_cache_predictor(merged, "options")
    try:
        return RuntimeConfig.model_validate(merged)
    except ValidationError as e:
        detail = validation_detail(e)
        loc = e.errors()[0]["loc"]
        if not loc:  # a rule across sections: the message names them
            raise MoeRtError(detail) from None
        from_file = path and loc[0] in doc and loc[0] not in given and loc[0] != "engine"
        raise MoeRtError(f"config file {path}: {detail}" if from_file else f"invalid option {detail}") from None


def load_expert_parallel(path: str | Path) -> ExpertParallelPlacement:
    """The `expert_parallel:` section of a config file (other sections are read by build_config)."""
    from parallel.placement import SECTION, placement_from_section

    doc = load_config_file(path)
    if SECTION not in doc:
        raise MoeRtError(f"config file {path}: no top-level '{SECTION}:' section")
    return placement_from_section(doc[SECTION], f"config file {path}: {SECTION}")
