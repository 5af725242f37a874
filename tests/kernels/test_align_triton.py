"""The one-launch Triton alignment gives exactly the torch alignment (its reference)."""
import pytest
import torch

from moe_rt.kernels.align import align_block_size
from moe_rt.kernels.align_triton import align_block_size_triton
from moe_rt.kernels.fused_moe import interpret_mode

# (T, K, S, M, fraction of -1 choices): decode and prefill sizes, S not a power of two, S larger
# than the pairs (most slots empty), many chunks of BLOCK_P (T*K > 1024), all pairs dropped.
CASES = [
    (1, 2, 8, 16, 0.0),
    (5, 2, 4, 2, 0.2),
    (37, 3, 7, 4, 0.3),
    (64, 4, 60, 16, 0.0),
    (3, 8, 256, 64, 0.0),
    (700, 2, 8, 64, 0.1),
    (2, 2, 5, 16, 1.0),
]
IDS = [f"T{c[0]}-K{c[1]}-S{c[2]}-M{c[3]}" for c in CASES]


def random_ids(T, K, S, neg_frac, device):
    ids = torch.stack([torch.randperm(S)[:K] for _ in range(T)])  # K distinct slots per token
    ids = torch.where(torch.rand(T, K) < neg_frac, torch.full_like(ids, -1), ids)
    return ids.to(device)


def assert_same(ids, M, S, seed):
    ref = align_block_size(ids.cpu(), M, S)
    got = align_block_size_triton(ids, M, S)
    assert got.num_pairs == ref.num_pairs and got.block_m == M
    for name in ("sorted_pair_ids", "block_slot_ids", "num_padded"):
        a, b = getattr(ref, name), getattr(got, name).cpu()
        assert b.dtype == torch.int32
        assert torch.equal(a, b), f"{name} differs (seed {seed}): {a.tolist()} vs {b.tolist()}"


@pytest.mark.skipif(not interpret_mode(), reason="CPU path needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_align_equals_torch_cpu(case, seed):
    T, K, S, M, neg = case
    assert_same(random_ids(T, K, S, neg, "cpu"), M, S, seed)


@pytest.mark.skipif(not interpret_mode(), reason="CPU path needs TRITON_INTERPRET=1")
def test_triton_align_accepts_int32_ids_and_a_hand_case():
    # pairs: 0:(t0,s1) 1:(t0,s0) 2:(t1,s1) 3:(t1,-1) 4:(t2,s2) 5:(t2,s1); sentinel P = 6
    r = align_block_size_triton(torch.tensor([[1, 0], [1, -1], [2, 1]], dtype=torch.int32), 2, 3)
    assert r.sorted_pair_ids.tolist() == [1, 6, 0, 2, 5, 6, 4, 6, 6, 6]
    assert r.block_slot_ids.tolist() == [0, 1, 1, 2, -1]
    assert r.num_padded.tolist() == [8]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpret_mode(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES + [(8192, 8, 256, 64, 0.0)], ids=IDS + ["T8192-K8-S256-M64"])
def test_triton_align_equals_torch_cuda(case, seed):
    T, K, S, M, neg = case
    assert_same(random_ids(T, K, S, neg, "cuda"), M, S, seed)
