import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from checkpoints import write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    """A tiny Mixtral checkpoint shared by the engine, API and CLI tests (read-only)."""
    return write_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral")


@pytest.fixture(scope="session")
def mixtral_llm(mixtral_dir):
    from moe_rt_app import LLM

    return LLM(mixtral_dir, dtype="float32", device="cpu", progress=False)
