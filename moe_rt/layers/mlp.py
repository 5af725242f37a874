import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


class DenseMLP(nn.Module):
    """SiLU-gated MLP; gate and up projections are one matrix [2I, D] (loaded from gate_proj/up_proj)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
