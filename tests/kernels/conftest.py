"""Kernel tests run on CPU through Triton's interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any @triton.jit function is decorated (Triton reads it then),
so it is set here, before the test modules import moe_rt.kernels.fused_moe. With a GPU we leave it
alone: the CUDA-marked tests then compile real kernels and the interpreter tests skip.
"""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (reported in failure messages); MOE_RT_TEST_SEED pins it."""
    value = int(os.environ.get("MOE_RT_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    return value
