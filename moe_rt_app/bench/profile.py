"""`moe-rt bench decode --profile`: what one decode step costs in operator calls, not seconds.

The torch profiler records N engine steps of pure decode (prefill and a few warm-up steps run
first, unrecorded) at each batch size. Each decoder layer, its attention and its MLP / MoE block
are marked as ranges (forward hooks, only while profiling), so every event is attributed to the
layer part it ran in, or to the rest of the step (embedding, final norm, head, sampler, scheduler).

What is counted, per decode step (one new token per sequence):

- **aten ops**: every `aten::` event the profiler records, nested ones included (`aten::linear`
  counts with the `aten::t`, `aten::matmul`, `aten::mm` it calls): the work the dispatcher does.
  `top_level` counts only the aten calls made from Python (no aten op above them).
- **host reads** (synchronisations on an accelerator): scalar reads `aten::_local_scalar_dense`
  (`.item()`, `int(t)`, `bool(t)`, `if t:`, and aten's own reads, such as the CPU `grouped_mm`
  reading each group's end); `aten::nonzero` and `aten::_unique2` / `unique_consecutive` /
  `unique_dim` (outputs whose size depends on the data: boolean-mask indexing, `unique`); and
  `Tensor.tolist()` / `.numpy()`, which record no aten op on a CPU tensor and are marked by a
  torch-function mode. A read nested in another read counts once. On a CPU device every tensor
  is in host memory, so a read costs no wait there; the counts show what would wait on a GPU.
  On CUDA, device-to-host copies (`Memcpy DtoH` activity) are counted as well.
- **compiled graph calls** (compile=True): calls into torch.compile'd code (`Torch-Compiled
  Region` events) and the time spent in them. The C++ loops inductor generates are not aten ops,
  so a compiled region counts only the aten calls it still makes (a whole compiled decode layer:
  its top-k).
- **top ops by self time**: the aten ops with the most self CPU time (time not spent in the ops
  they call), with their calls per step.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

LAYER, ATTN, MLP, TOLIST = "moe_rt::layer", "moe_rt::attention", "moe_rt::mlp", "moe_rt::tolist"
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_consecutive",
                      "aten::unique_dim", TOLIST})
WARMUP_STEPS = 2


class _MarkHostReads(TorchFunctionMode):
    """Wraps Tensor.tolist / Tensor.numpy in a profiler range: on a CPU tensor they call no aten op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            with record_function(TOLIST):
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextmanager
def _mark_layers(model):
    """Profiler ranges around each decoder layer, its attention and its MLP, via forward hooks;
    with compile=True, around each call of a whole compiled decode layer (compiled_decode.py),
    whose attention and MLP are one graph and have no ranges of their own."""
    handles, open_ranges = [], []
    whole = getattr(model, "compiled_decode", None)
    if whole is not None:
        compiled_layer = whole.fn

        def marked(*args):
            with record_function(LAYER):
                return compiled_layer(*args)
        whole.fn = marked

    def enter(name):
        def hook(module, args):
            rf = record_function(name)
            rf.__enter__()
            open_ranges.append(rf)
        return hook

    def leave(module, args, out):
        open_ranges.pop().__exit__(None, None, None)

    for layer in model.layers:
        for mod, name in ((layer, LAYER), (layer.self_attn, ATTN), (layer.mlp, MLP)):
            handles += [mod.register_forward_pre_hook(enter(name)), mod.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if whole is not None:
            whole.fn = compiled_layer


def _region(ev) -> str:
    """The innermost marked range an event ran in: 'attention', 'mlp', 'layer' or 'outside'."""
    p = ev.cpu_parent
    while p is not None:
        if p.name == ATTN:
            return "attention"
        if p.name == MLP:
            return "mlp"
        if p.name == LAYER:
            return "layer"
        p = p.cpu_parent
    return "outside"


def _aten_parent(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


def _under_sync(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name in SYNC_OPS:
            return True
        p = p.cpu_parent
    return False


def summarise(events, steps: int, num_layers: int, batch: int, top: int = 10) -> dict:
    """Per-step counts from profiler events (see the module docstring for what is counted)."""
    ops = defaultdict(int)  # region -> aten events
    top_level = 0  # aten calls from Python inside decoder layers
    syncs = defaultdict(int)  # op name -> reads
    moe_syncs = 0
    d2h = 0
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # name -> [calls, self us]
    compiled, compiled_us = 0, 0.0
    for ev in events:
        name = ev.name
        if name.startswith("Torch-Compiled Region"):
            compiled += 1
            compiled_us += ev.cpu_time_total
        if "Memcpy DtoH" in name or "Memcpy Device -> Host" in name:  # CUDA activity names
            d2h += 1
            continue
        if name in SYNC_OPS and not _under_sync(ev):
            syncs[name] += 1
            moe_syncs += _region(ev) == "mlp"
        if not name.startswith("aten::"):
            continue
        region = _region(ev)
        ops[region] += 1
        if region != "outside" and not _aten_parent(ev):
            top_level += 1
        agg = by_name[name]
        agg[0] += 1
        agg[1] += ev.self_cpu_time_total
    in_layers = ops["attention"] + ops["mlp"] + ops["layer"]
    per_layer = in_layers / (steps * num_layers)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "batch": batch,
        "steps": steps,
        "aten_ops_step": sum(ops.values()) / steps,
        "aten_ops_layer": per_layer,
        "aten_ops_layer_token": per_layer / batch,
        "top_level_ops_layer": top_level / (steps * num_layers),
        "attention_ops_layer": ops["attention"] / (steps * num_layers),
        "mlp_ops_layer": ops["mlp"] / (steps * num_layers),
        "outside_ops_step": ops["outside"] / steps,
        "host_reads_step": sum(syncs.values()) / steps,
        "moe_host_reads_step": moe_syncs / steps,
        "host_reads_by_op": {k: v / steps for k, v in sorted(syncs.items())},
        "d2h_copies_step": d2h / steps,
        "compiled_calls_step": compiled / steps,
        "compiled_ms_step": compiled_us / 1e3 / steps,
        "top_ops": [{"op": n, "calls_step": c / steps, "self_ms_step": us / 1e3 / steps} for n, (c, us) in ranked],
    }


def profile_decode(llm, prompts: list[list[int]], steps: int) -> dict:
    """Profile `steps` pure-decode engine steps of the batch `prompts` (prefill and warm-up unrecorded)."""
    from moe_rt import SamplingParams

    from .decode import run_prefills

    eng = llm.engine
    params = SamplingParams(max_tokens=WARMUP_STEPS + steps + 1, temperature=0, ignore_eos=True)
    rids = [eng.add_request(p, params) for p in prompts]
    try:
        run_prefills(eng, rids)
        activities = [ProfilerActivity.CPU]
        if eng.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        # The warm-up steps run under the host-read marker too: compiled code is guarded on the
        # torch-function modes in force, and would otherwise recompile inside the recording
        with _MarkHostReads():
            for _ in range(WARMUP_STEPS):
                eng.step()
            with _mark_layers(llm.model), profile(activities=activities) as prof:
                for _ in range(steps):
                    eng.step()
                if eng.device.type == "cuda":
                    torch.cuda.synchronize()
    finally:
        for r in rids:
            eng.abort(r)
    return summarise(prof.events(), steps, llm.model.spec.num_layers, len(prompts))


def print_profile(res: dict) -> None:
    """The human-readable form of one batch size's profile."""
    print(f"batch {res['batch']}: {res['aten_ops_layer']:.1f} aten ops per layer per decode step "
          f"({res['aten_ops_layer_token']:.1f} per token; attention {res['attention_ops_layer']:.1f}, "
          f"mlp {res['mlp_ops_layer']:.1f}, top-level {res['top_level_ops_layer']:.1f}); "
          f"{res['aten_ops_step']:.0f} per step, {res['outside_ops_step']:.0f} outside the layers")
    reads = ", ".join(f"{k} {v:g}" for k, v in res["host_reads_by_op"].items()) or "none"
    print(f"  host reads per step: {res['host_reads_step']:g} (MoE blocks {res['moe_host_reads_step']:g}; {reads})"
          + (f"; device-to-host copies {res['d2h_copies_step']:g}" if res["d2h_copies_step"] else ""))
    if res["compiled_calls_step"]:
        print(f"  compiled graph calls per step: {res['compiled_calls_step']:g} ({res['compiled_ms_step']:.3f} ms in them)")
    print("  top ops by self time (per step):")
    for t in res["top_ops"]:
        print(f"    {t['op']:<40} {t['calls_step']:8.1f} calls {t['self_ms_step']:9.3f} ms")
