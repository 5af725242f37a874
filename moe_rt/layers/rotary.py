"""Rotary position embedding (the non-interleaved "rotate half" form used by Llama-style models)."""
import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset(torch.device("cpu") if self.cos.is_meta else self.cos.device)

    def reset(self, device: torch.device) -> None:
        """(Re)build the tables in float32 on `device`; called again after the model is cast or moved,
        because the tables must not be rounded to bf16 ahead of time."""
        hd = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
        freqs = torch.arange(self.max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
        self.cos, self.sin = emb.cos(), emb.sin()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, hd] of `positions`, cast to the compute dtype; done once per forward."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    @staticmethod
    def apply(cs: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        cos, sin = cs
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, hd], k [T, KV, hd], positions [T] -> rotated q, k."""
        return self.apply(self.lookup(positions, q.dtype), q, k)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)
