import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's arithmetic (float32 for low-precision inputs, cast back), as a plain function for
    callers that trace it (compile=True, moe_rt/models/compiled_decode.py)."""
    if x.dtype == torch.float32:
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * weight
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as Hugging Face does (parity depends on it)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self._consts: tuple[torch.Tensor, torch.Tensor] | None = None  # (dim, eps) as float32 0-d tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # F.rms_norm's own arithmetic on CPU (x * rsqrt(sum(x * x) / dim + eps) * weight, the
            # sum being the one mean takes) in 7 aten ops instead of its 24: dim and eps as float32
            # tensors spare the conversion of a Python scalar on every call, and addcdiv is the
            # division and the add in one op (eps + sum / dim, rounded after each step as before);
            # same values, same result.
            c = self._consts
            if c is None or c[0].device != x.device:
                c = self._consts = (torch.tensor(float(x.shape[-1]), device=x.device),
                                    torch.tensor(self.eps, dtype=torch.float32, device=x.device))
            return x * torch.rsqrt(torch.addcdiv(c[1], (x * x).sum(-1, keepdim=True), c[0])) * self.weight
        return rms_norm(x, self.weight, self.eps)
