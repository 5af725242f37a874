"""Rotary position embedding: the "rotate half" form of Llama-style models, and the interleaved-pair
form of DeepSeek MLA; plain or YaRN-scaled frequencies."""
import torch
from torch import nn

from moe_rt.models.spec import YarnSpec

from . import yarn as yarn_math


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, yarn: YarnSpec | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.yarn = head_dim, max_positions, theta, yarn
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset(torch.device("cpu") if self.cos.is_meta else self.cos.device)

    def reset(self, device: torch.device) -> None:
        """(Re)build the tables in float32 on `device`; called again after the model is cast or moved,
        because the tables must not be rounded to bf16 ahead of time."""
        hd = self.head_dim
        if self.yarn is None:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
            scale = 1.0
        else:
            inv_freq = yarn_math.inv_freq(hd, self.theta, self.yarn, device)
            scale = yarn_math.attention_factor(self.yarn)
        freqs = torch.arange(self.max_positions, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, hd]
        self.cos, self.sin = emb.cos() * scale, emb.sin() * scale

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, hd] of `positions`, cast to the compute dtype; done once per forward."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    @staticmethod
    def apply(cs: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        cos, sin = cs
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @staticmethod
    def apply_interleaved(cs: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor):
        """Pairs (x0, x1), (x2, x3), ... each turned by one frequency (DeepSeek). The result is laid
        out de-interleaved, [even outputs | odd outputs], as transformers' DeepSeek-V3 does: a fixed
        permutation applied to q and k alike leaves every q.k product, hence attention, unchanged."""
        half = cs[0].shape[-1] // 2
        cos, sin = cs[0][..., :half], cs[1][..., :half]
        return tuple(
            torch.cat([x[..., 0::2] * cos - x[..., 1::2] * sin, x[..., 1::2] * cos + x[..., 0::2] * sin], dim=-1)
            for x in (q, k)
        )

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, hd], k [T, KV, hd], positions [T] -> rotated q, k."""
        return self.apply(self.lookup(positions, q.dtype), q, k)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)
