"""Device and dtype names resolve in one place; a device that cannot be used is refused there,
before anything loads, in one line."""
import pytest
import torch

from moe_rt.device import resolve_device, resolve_dtype
from moe_rt.errors import MoeRtError


def test_names_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32


@pytest.mark.parametrize("name, message", [("tpu", "unknown device"), ("meta", "not supported")])
def test_unusable_names_are_refused(name, message):
    with pytest.raises(MoeRtError, match=message):
        resolve_device(name)


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch):
    # Pretend to be a 2-GPU machine: cuda:1 is accepted, cuda:99 is refused by name.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(MoeRtError, match=r"'cuda:99' does not exist: this machine has 2 CUDA GPU"):
        resolve_device("cuda:99")


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MoeRtError, match="no CUDA GPU is available"):
        resolve_device("cuda:0")
