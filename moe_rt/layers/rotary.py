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
        # [P, 4 * hd]: cos | sin | turn per position, so one index per forward looks them all up
        self.register_buffer("table", torch.empty(0), persistent=False)
        self.reset(torch.device("cpu") if self.table.is_meta else self.table.device)

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
        cos, sin = emb.cos() * scale, emb.sin() * scale
        half = hd // 2
        # turn = [[cos, -sin], [sin, cos]] by halves ([2, 2, hd / 2] per position): output half i is
        # sum_j x_half_j * turn[i, j], the rotate-half rule x * cos + rotate_half(x) * sin (rotate)
        cs, sn = cos[:, :half], sin[:, :half]
        self.table = torch.cat((cos, sin, cs, -sn, sin[:, half:], cos[:, half:]), dim=-1)

    @property
    def cos(self) -> torch.Tensor:
        return self.table[:, : self.head_dim]

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos [T, 1, hd], sin [T, 1, hd], turn [T, 1, 2, 2, hd / 2]) of `positions`, cast to the
        compute dtype; done once per forward. Each part is one as_strided view of the looked-up rows
        (one dispatched op each, where slicing and unsqueezing take two or more)."""
        hd, half = self.head_dim, self.head_dim // 2
        t = self.table[positions]
        t = t if t.dtype == dtype else t.to(dtype)  # .to dispatches an op even when it has nothing to do
        T, w = t.shape
        return (t.as_strided((T, 1, hd), (w, hd, 1)), t.as_strided((T, 1, hd), (w, hd, 1), hd),
                t.as_strided((T, 1, 2, 2, half), (w, 2 * hd, hd, half, 1), 2 * hd))

    @staticmethod
    def rotate(cs: tuple[torch.Tensor, ...], x: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """The first `heads` (default: all) heads of x [T, N, hd] (any strides)
        turned by the rotate-half rule, x * cos + rotate_half(x) * sin -> [T, heads, hd] contiguous.
        Written as a 2 x 2 contraction over the halves: one multiply by turn and a sum over two
        terms, the same two products and the same sum per element as the rule (bit for bit), in
        6 dispatched ops where flipping the halves took 9 and slicing the heads 2 more."""
        T, N, hd = x.shape
        n, half = N if heads is None else heads, hd // 2
        e = x.stride(2)
        halves = x.as_strided((T, n, 1, 2, half), (x.stride(0), x.stride(1), 0, half * e, e), x.storage_offset())
        return (halves * cs[2]).sum(3).view(T, n, hd)

    @classmethod
    def apply(cls, cs: tuple[torch.Tensor, ...], q: torch.Tensor, k: torch.Tensor):
        return cls.rotate(cs, q), cls.rotate(cs, k)

    @staticmethod
    def apply_interleaved(cs: tuple[torch.Tensor, ...], q: torch.Tensor, k: torch.Tensor):
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
