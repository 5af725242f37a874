"""moe-rt: a serving runtime for Mixture-of-Experts language models."""
from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "MoeRtError"]


def __getattr__(name):
    # LLM pulls in torch and the engine; import it on first use so `moe-rt --help` stays fast.
    if name == "LLM":
        from moe_rt.llm import LLM

        return LLM
    raise AttributeError(name)
