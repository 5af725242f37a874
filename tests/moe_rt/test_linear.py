"""moe_rt.layers.linear: the (w·xᵀ)ᵀ form CPU float32 projections of up to ROW_MAJOR_MAX_ROWS rows
take, and the plain x·wᵀ of small (router-sized) weights, against F.linear on the same inputs; the
other inputs go to F.linear itself."""
import pytest
import torch
import torch.nn.functional as F

from moe_rt.layers.linear import FEW_OUTPUTS, ROW_MAJOR_MAX_ROWS, SMALL_WEIGHT, Linear, linear


# (N, K): a weight past SMALL_WEIGHT (the transposed form), a small one, and one of few outputs
SHAPES = [(FEW_OUTPUTS + 16, SMALL_WEIGHT // (FEW_OUTPUTS + 16) + 8), (48, 32), (FEW_OUTPUTS, SMALL_WEIGHT // 16)]


@pytest.mark.parametrize("rows", [0, 1, 2, 5, ROW_MAJOR_MAX_ROWS, ROW_MAJOR_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("N,K", SHAPES)
def test_matches_f_linear(rows, bias, N, K):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(rows, K, generator=g)
    y = linear(x, w, b)
    assert y.shape == (rows, N) and y.is_contiguous()
    # the same products; only BLAS's order of the additions may differ
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    plain = N * K <= SMALL_WEIGHT or (rows == 1 and N <= FEW_OUTPUTS)
    if rows > ROW_MAJOR_MAX_ROWS or (plain and rows):
        assert torch.equal(y, F.linear(x, w, b))  # F.linear's own product


def test_one_row_may_stay_a_view():
    """contiguous=False: one row of a large weight comes back as a strided view of the transposed
    product, equal to the contiguous result; several rows, and small weights, are contiguous."""
    g = torch.Generator().manual_seed(3)
    N, K = SHAPES[0]
    w = torch.randn(N, K, generator=g)
    x = torch.randn(1, K, generator=g)
    y = linear(x, w, contiguous=False)
    assert not y.is_contiguous() and y.stride(1) == 2
    assert torch.equal(y, linear(x, w))
    assert linear(torch.randn(3, K, generator=g), w, contiguous=False).is_contiguous()
    assert linear(x[:, :32], torch.randn(48, 32, generator=g), contiguous=False).is_contiguous()


def test_leading_dims_and_strided_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    x = torch.randn(3, 2, 16, generator=g)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    cols = torch.randn(16, 4, generator=g).t()  # rows that are not contiguous
    y = linear(cols, w)
    assert y.is_contiguous() and y.view(4, 3, 8).shape == (4, 3, 8)
    torch.testing.assert_close(y, F.linear(cols, w), rtol=1e-5, atol=1e-5)


def test_half_precision_is_f_linear_exactly():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 16, generator=g).bfloat16()
    x = torch.randn(2, 16, generator=g).bfloat16()
    assert torch.equal(linear(x, w), F.linear(x, w))


def test_module_loads_and_runs_like_nn_linear():
    ref = torch.nn.Linear(16, 8)
    mine = Linear(16, 8)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(1, 16)
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
