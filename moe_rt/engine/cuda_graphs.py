"""`cuda_graphs=True`: decode-only steps replayed from CUDA graphs, one per (batch, width) shape.

A decode step on a GPU launches hundreds of small kernels whose launch cost, not their work, sets
the step time at small batch. Captured once, the whole step (embedding, every layer's attention
and MoE, the final norm and the LM head) replays as one launch. Prefill and mixed steps, whose
row counts vary with the prompts, run eager (ModelRunner.run).

How a step is made replayable:
  * its inputs live in one static int64 buffer (decode_rows.py's layout) that every graph reads
    through its own views; a step writes its rows there with one host-to-device copy;
  * a batch of n sequences pads to the next captured batch size, and its block tables to the next
    captured width (both doubling, decode_rows.doubling_sizes). Padding rows write their key and
    value to a scratch slot past the last block (no sequence is ever given it) and their logits
    are dropped; padding table entries point at block 0 behind the context-length mask;
  * the attention metadata of a graph is built from those views, and its derived tensors (key
    slots, masks, rope rows) are computed by ops inside the capture, so a replay recomputes them
    from the new inputs;
  * graphs are captured lazily, the first time their shape is needed (one at construction, the
    largest batch at the narrowest width, so an uncapturable step is refused at start-up), all
    into one memory pool. Outputs are copied out right after each replay: a later capture may
    reuse an earlier graph's scratch memory, never while that graph's output is still wanted.

What must hold inside the captured region: no host synchronisation and no Python that depends on
the data. The core's decode path keeps it (attention, rope, routing, a resident expert store, the
Triton experts, and the torch experts on GPUs where grouped_mm runs without reading its offsets
back). Before a shape is captured its step runs once with CUDA's sync debug mode set to "error",
so a host read anywhere (the loop backend, grouped_mm's fallback) is refused in one line instead
of being baked into a graph. What makes steps host-dependent by design is refused with the
config (expert cache, predictor, expert parallelism, dynamic top-k, expert-aware scheduling,
compile); anything that still makes a step listen to routing at run time (an observer subscribed
later, such as a trace recorder) sends that step down the eager path (graph_blocker).

On the CPU the same static path runs uncaptured, so tests check the padding and the static
buffers against the eager engine without a GPU (tests/moe_rt/test_cuda_graphs.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moe_rt.errors import MoeRtError
from moe_rt.layers.attention import AttentionMetadata
from moe_rt.layers.moe.block import MoEContext
from moe_rt.layers.moe.dispatch import LocalDispatcher
from moe_rt.layers.moe.store import ResidentExpertStore

from .decode_rows import DecodeRows, bucket, decode_views, doubling_sizes

# (ids [B], positions [B], metadata) -> logits [B, V]: the model's forward and LM head.
DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


@dataclass(frozen=True)
class GraphShapes:
    """The shapes decode steps are captured for, ascending."""

    batch_sizes: tuple[int, ...]
    widths: tuple[int, ...]  # block-table widths in blocks

    @classmethod
    def for_engine(cls, max_num_seqs: int, max_model_len: int, block_size: int) -> "GraphShapes":
        return cls(doubling_sizes(max_num_seqs), doubling_sizes(-(-max_model_len // block_size)))


def graph_blocker(ctx: MoEContext) -> str | None:
    """Why a decode step cannot replay a graph now (a part reads or changes each step's routing on
    the host), or None when it can."""
    if ctx.hub.active:
        return "an observer or forecaster reads every step's routing"
    if ctx.dynamic_topk is not None:
        return "dynamic top-k counts each step's kept choices"
    if not isinstance(ctx.store, ResidentExpertStore):
        return "the expert store changes which experts are resident step by step"
    if not isinstance(ctx.dispatcher, LocalDispatcher):
        return "the dispatcher moves tokens between ranks"
    return None


class _Replay:
    """A captured step: replay() reruns its kernels on whatever the static buffer holds."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", out: torch.Tensor, device: torch.device) -> None:
        self.graph, self.out, self.device = graph, out, device

    def __call__(self) -> torch.Tensor:
        with torch.cuda.device(self.device):  # the graph's own device, whichever is current
            self.graph.replay()
        return self.out


class DecodeGraphs:
    """The static input buffer and the captured decode steps of one model runner."""

    def __init__(self, forward: DecodeForward, shapes: GraphShapes, block_size: int, scratch_slot: int,
                 device: torch.device) -> None:
        self.forward, self.shapes, self.block_size = forward, shapes, block_size
        self.scratch_slot, self.device = scratch_slot, device
        self.capture = device.type == "cuda"  # on the CPU the static path runs uncaptured
        B, W = shapes.batch_sizes[-1], shapes.widths[-1]
        self.flat = torch.zeros(4 * B + B * W, dtype=torch.int64, device=device)
        self.steps: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}  # (batch, width) -> step
        self.replays = 0  # decode steps served from here
        self._pool = None  # the memory pool every graph shares, once the first is captured
        if self.capture:
            self._step(B, shapes.widths[0])

    def run(self, rows: DecodeRows) -> torch.Tensor:
        """Logits [n, V] of the n rows, from the step captured for their padded shape. The engine
        keeps n <= max_num_seqs and every table within max_model_len, so a shape always exists."""
        B, W = bucket(len(rows), self.shapes.batch_sizes), bucket(rows.width, self.shapes.widths)
        step = self._step(B, W)  # before the load: a capture fills the buffer with padding rows
        self._load(rows.padded(B, W, self.scratch_slot))
        out = step()
        self.replays += 1
        return out[: len(rows)].clone()  # the next replay overwrites out

    def stats(self) -> dict:
        """For moe_stats (and the server's /metrics): graphs captured, decode steps replayed."""
        return {"captured": len(self.steps), "replayed_steps": self.replays}

    def _load(self, values: list[int]) -> None:
        self.flat[: len(values)].copy_(torch.tensor(values, dtype=torch.int64))

    def _forward(self, B: int, W: int) -> torch.Tensor:
        ids, pos, slots, lens, tables = decode_views(self.flat, B, W)
        # A new metadata object per call: the key slots and masks it caches (_shared) must be
        # computed by the ops being captured, never carried over from a warm-up run.
        meta = AttentionMetadata([], slot_mapping=slots, block_tables=tables, block_size=self.block_size,
                                 context_lens=lens)
        return self.forward(ids, pos, meta)

    def _step(self, B: int, W: int) -> Callable[[], torch.Tensor]:
        step = self.steps.get((B, W))
        if step is None:
            step = self.steps[(B, W)] = self._capture(B, W) if self.capture else (lambda: self._forward(B, W))
        return step

    @torch.inference_mode()
    def _capture(self, B: int, W: int) -> _Replay:
        # Every row a padding row: the warm-up runs and the capture write only the scratch slot.
        self._load(DecodeRows([], [], [], [], []).padded(B, W, self.scratch_slot))
        with torch.cuda.device(self.device):
            # First run: lazy set-up outside the capture (cuBLAS handles, Triton compiles, the norms'
            # constants copied to the device). Second run: no host read may remain.
            self._forward(B, W)
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                self._forward(B, W)
            except RuntimeError as e:
                raise MoeRtError(f"cuda_graphs: the decode step reads the GPU from the host "
                                 f"({_first_line(e)}), so it cannot be captured; {HINT}") from None
            finally:
                torch.cuda.set_sync_debug_mode(mode)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    out = self._forward(B, W)
            except RuntimeError as e:
                raise MoeRtError(f"cuda_graphs: capturing the decode step for batch {B} failed "
                                 f"({_first_line(e)}); {HINT}") from None
            if self._pool is None:
                self._pool = graph.pool()
            torch.cuda.synchronize()
        return _Replay(graph, out, self.device)


HINT = ("run without cuda_graphs, or with expert_compute triton (the torch experts read grouped_mm's offsets "
        "back on GPUs and dtypes its fused kernel does not cover)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
