"""moe_rt.layers.linear: the (w·xᵀ)ᵀ form CPU float32 projections of up to ROW_MAJOR_MAX_ROWS rows
take, against F.linear on the same inputs; the other inputs go to F.linear itself."""
import pytest
import torch
import torch.nn.functional as F

from moe_rt.layers.linear import ROW_MAJOR_MAX_ROWS, Linear, linear


@pytest.mark.parametrize("rows", [0, 1, 2, 5, ROW_MAJOR_MAX_ROWS, ROW_MAJOR_MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 32, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    x = torch.randn(rows, 32, generator=g)
    y = linear(x, w, b)
    assert y.shape == (rows, 48) and y.is_contiguous()
    # the same products; only BLAS's order of the additions may differ
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    if rows > ROW_MAJOR_MAX_ROWS:
        assert torch.equal(y, F.linear(x, w, b))  # past the rule: F.linear itself


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
