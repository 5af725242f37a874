"""moe-rt's core: config, models, layers, engine, kernels and the checkpoint loader.

It imports nothing built on it (expert_cache, router_predict, parallel, server, moe_rt_app);
tests/test_layering.py keeps it so. The Python API (`LLM`) and the CLI live in moe_rt_app,
which assembles the core with the expert cache, routing predictors and expert parallelism.
"""
from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams

__all__ = ["SamplingParams", "MoeRtError"]
