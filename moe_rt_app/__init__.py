"""moe-rt's Python API and command line, above every package:

    from moe_rt_app import LLM, SamplingParams

`LLM`, the CLI, the server and the expert-parallel ranks all turn a config into a running engine
through one assembly module (moe_rt_app/assemble.py).
"""
from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "MoeRtError"]


def __getattr__(name):
    # LLM pulls in torch and the engine; import it on first use so `moe-rt --help` stays fast.
    if name == "LLM":
        from moe_rt_app.llm import LLM

        return LLM
    raise AttributeError(name)
