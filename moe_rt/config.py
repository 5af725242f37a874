"""The core's sections of the config tree: which model to run, and how the engine batches it.

The whole tree (these plus the cache, predictor, expert-parallel and server sections of the
packages built on the core) is composed in moe_rt_app/config.py. Values discovered at start-up
(KV blocks, max_model_len after the budget) live in the engine's runtime state, never written
back here.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe_rt.errors import MoeRtError
from moe_rt.quant.plan import BitsPlan, load_plan


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(32, ge=1, description="sequences decoded together at most (running batch)")
    max_num_batched_tokens: int = Field(2048, ge=1, description="prompt tokens in one prefill step (a longer prompt runs alone)")
    max_model_len: int | None = Field(None, ge=2, description="context length (prompt + output); default: the model's, capped by the KV budget")
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="memory for the paged KV cache in GiB; default: 1 on CPU, and on CUDA what "
                                "gpu_memory_utilization leaves after the weights and the expert cache")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="CUDA: the fraction of the GPU's memory the engine may fill (weights, "
                                     "expert cache, KV cache) when kv_cache_memory_gb is not given")
    kv_block_size: int = Field(16, ge=1, description="tokens per KV block")
    expert_compute: Literal["torch", "loop", "triton", "reference"] = Field("torch", description="expert-compute backend")
    seed: int = Field(0, description="seed of the sampler for requests without their own seed")
    scheduler_policy: Literal["fcfs", "expert_aware"] = Field(
        "fcfs", description="which running sequences decode together: fcfs (all of them every step) or "
                            "expert_aware (a subset whose predicted experts overlap; docs/scheduling.md)")
    expert_aware_batch: int | None = Field(
        None, ge=1, description="expert_aware: sequences decoded per step (default: as many as decode the most "
                                    "tokens per second under measured step and expert-read times)")
    expert_aware_max_skips: int = Field(
        3, ge=1, description="expert_aware: a sequence left out this many steps in a row decodes in the next")
    dynamic_topk_threshold: float = Field(
        0.0, ge=0, lt=1, description="drop a token's routed choice whose weight, normalised over its top-k, is below "
                                     "this (0 = off; the best choice is always kept)")
    dynamic_topk_top_p: float = Field(
        1.0, gt=0, le=1, description="keep a token's fewest routed choices whose normalised weights sum to at least "
                                     "this (1 = off)")

    compile: bool = Field(
        False, description="torch.compile: a decode step of one token (up to 8 with small experts, 32 in bfloat16) as one "
                           "compiled graph per layer (float32 or bfloat16 on the CPU, experts resident, no routing observers; "
                           "grouped-query or MLA attention; models/compiled_decode.py); "
                           "docs/benchmarks.md has what it gains. Graphs compile at the first step of each "
                           "shape, or all at once in LLM.warm_up() (serve runs it before it listens)")
    cuda_graphs: bool = Field(
        False, description="CUDA only: replay decode-only steps from CUDA graphs captured per batch size "
                           "(padded up to 1, 2, 4, ... max_num_seqs) and block-table width; prefill and "
                           "mixed steps stay eager (docs/benchmarks.md, 'CUDA graphs')")

    # Quantized experts (docs/quantization.md): routed experts only; dense weights keep the dtype.
    expert_bits: Literal[8, 4] | None = Field(
        None, description="store routed experts in 8 bits (int8, one scale per output row) or 4 bits "
                          "(int4, a scale and zero per group), quantized at load; None keeps the compute dtype"
    )
    expert_group_size: Literal[32, 64, 128] = Field(
        64, description="int4 experts: input columns per scale and zero (must divide the expert's hidden "
                        "and intermediate sizes); unused for 8 bits"
    )
    expert_bits_plan: BitsPlan | None = Field(
        None, description="per-expert widths (docs/quantization.md, 'Per-expert bitwidth plans'): the path "
                          "of a plan YAML file, or the plan itself inline; read and validated here, expert "
                          "ranges checked at load. Excludes expert_bits")

    @field_validator("expert_bits_plan", mode="before")
    @classmethod
    def _read_plan(cls, v):
        try:
            return None if v is None else load_plan(v)
        except MoeRtError as e:  # pydantic reports ValueErrors, as one line
            raise ValueError(str(e)) from None

    @model_validator(mode="after")
    def _one_width_rule(self) -> "EngineConfig":
        if self.expert_bits is not None and self.expert_bits_plan is not None:
            raise ValueError("expert_bits (one width for every expert) and a bits plan are both set; give one")
        return self

    @model_validator(mode="after")
    def _graph_rules(self) -> "EngineConfig":
        """A captured step replays fixed kernels: what decides per step on the host is refused."""
        if not self.cuda_graphs:
            return self
        if self.compile:
            raise ValueError("compile and cuda_graphs do not combine (a graph would check the compiled "
                             "region's guards once, at capture); choose one")
        if self.dynamic_topk_threshold > 0 or self.dynamic_topk_top_p < 1:
            raise ValueError("cuda_graphs does not combine with dynamic top-k (dynamic_topk_threshold, "
                             "dynamic_topk_top_p), which counts each step's kept choices on the host")
        if self.scheduler_policy != "fcfs":
            raise ValueError("cuda_graphs needs scheduler_policy fcfs (expert_aware reads every step's "
                             "routing on the host)")
        if self.expert_compute in ("loop", "reference"):
            raise ValueError(f"cuda_graphs needs expert_compute torch or triton ({self.expert_compute} reads "
                             "the routing back on the host)")
        return self


class ModelConfig(BaseModel):
    """Which checkpoint to run, in which numerics, where."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model: str = Field(description="Hugging Face checkpoint folder")
    dtype: str = Field("auto", description="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on CUDA)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto")
