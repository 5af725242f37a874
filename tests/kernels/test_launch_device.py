"""Triton kernels launch on their tensors' device, whatever the calling thread's current device:
the server's engine runs in its own thread, and `--device cuda:1` must not launch on cuda:0."""
import threading

import pytest
import torch

from moe_rt.device import launch_device
from moe_rt.kernels.align import align_block_size
from moe_rt.kernels.align_triton import align_block_size_triton
from moe_rt.kernels.fused_moe import fused_experts, interpret_mode
from moe_rt.layers.moe.reference import reference_experts


def test_launch_device_is_a_no_op_off_cuda():
    before = torch.cuda.current_device() if torch.cuda.is_available() else None
    with launch_device(torch.zeros(1)):
        if before is not None:
            assert torch.cuda.current_device() == before


def in_fresh_thread(fn, device: torch.device):
    """fn() on a new thread whose current CUDA device is cuda:0; returns its result or raises."""
    out = {}

    def run():
        try:
            torch.cuda.set_device(0)  # what a fresh thread starts with; explicit, whatever the test runner did
            out["value"] = fn()
            torch.cuda.synchronize(device)
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def last_gpu() -> torch.device:
    # With two or more GPUs the tensors are on another device than the thread's current one.
    return torch.device("cuda", torch.cuda.device_count() - 1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpret_mode(), reason="needs a CUDA GPU")
def test_fused_experts_from_a_fresh_thread_runs_on_the_tensors_device():
    dev = last_gpu()
    g = torch.Generator().manual_seed(0)
    T, D, I, S, K = 9, 64, 48, 4, 2
    hidden = torch.randn(T, D, generator=g).to(dev)
    w13 = (torch.randn(S, 2 * I, D, generator=g) / D**0.5).to(dev)
    w2 = (torch.randn(S, D, I, generator=g) / I**0.5).to(dev)
    ids = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]).to(dev)
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1).to(dev)

    out = in_fresh_thread(lambda: fused_experts(hidden, w13, w2, ids, weights), dev)
    assert out.device == dev
    torch.testing.assert_close(out, reference_experts(hidden, w13, w2, ids, weights), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpret_mode(), reason="needs a CUDA GPU")
def test_alignment_from_a_fresh_thread_runs_on_the_tensors_device():
    dev = last_gpu()
    ids = torch.tensor([[3, 0], [1, -1], [3, 2], [0, 1]], device=dev)

    got = in_fresh_thread(lambda: align_block_size_triton(ids, 16, 4), dev)
    ref = align_block_size(ids.cpu(), 16, 4)
    assert got.sorted_pair_ids.device == dev
    for name in ("sorted_pair_ids", "block_slot_ids", "num_padded"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name)), name
