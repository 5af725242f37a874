"""llama.cpp as a decode baseline (`bench decode --baselines llama.cpp`), through llama-cpp-python's
bindings to llama.cpp's C API, on the same checkpoint written as GGUF (gguf_export.py).

The optional extra: `pip install llama-cpp-python gguf` (llama-cpp-python builds llama.cpp from
source where no wheel exists for the machine: ~12 minutes on 2 cores). Without it the baseline is
skipped with one line.

The timing mirrors bench decode's moe-rt side: B prompts are prefilled in one llama_decode call
(untimed); then each step decodes one token per sequence in one batch (B sequences, one seq id
each) and picks each sequence's greedy token; the clock runs from the first sampled token to the
last, i.e. max_tokens - 1 decode steps, greedy choice included.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import numpy as np

from moe_rt.errors import MoeRtError


def available() -> str | None:
    """None when the baseline can run, else the one line saying why not."""
    missing = [m for m in ("llama_cpp", "gguf") if not _importable(m)]
    if missing:
        return (f"llama.cpp baseline skipped: {' and '.join(missing)} not installed "
                "(pip install llama-cpp-python gguf; see docs/benchmarks.md)")
    return None


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def gguf_for(model_dir: str | Path, cache_dir: str | Path, dtype: str = "float32", progress: bool = True) -> Path:
    """The GGUF file of `model_dir` in `cache_dir`, written once: its name carries the checkpoint's
    fingerprint (the one expert packs are checked against) and its config and tokenizer files'
    sizes and mtimes, so a changed checkpoint gets a new file."""
    from expert_cache.packs import source_fingerprint
    from moe_rt.checkpoint import CheckpointReader

    from .gguf_export import export_gguf

    model_dir = Path(model_dir).resolve()
    h = hashlib.sha256(source_fingerprint(CheckpointReader(model_dir)).encode())
    for f in (model_dir / "config.json", model_dir / "tokenizer.json"):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    path = Path(cache_dir) / f"{model_dir.name}-{dtype}-{h.hexdigest()[:16]}.gguf"
    if not path.is_file():
        if progress:
            print(f"writing {path} for the llama.cpp baseline", file=sys.stderr)
        export_gguf(model_dir, path, dtype)
    return path


class LlamaCppDecoder:
    """One llama.cpp model and context sized for `max_batch` sequences of `max_len` tokens."""

    def __init__(self, gguf_path: str | Path, *, threads: int, max_batch: int, max_len: int,
                 exact: bool = True) -> None:
        """exact: float32 KV cache and no flash attention, so an fp32 model runs fp32 attention on
        both sides (its logits then match transformers' to ~1e-6). llama.cpp's defaults (float16
        KV cache, flash attention, which rounds queries to float16 on the CPU) move logits by
        ~1e-3 and flip near-tied greedy choices."""
        import llama_cpp as lc

        self.lc = lc
        lc.llama_log_set(_QUIET, None)  # llama.cpp logs every tensor it loads to stderr
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise MoeRtError(f"llama.cpp could not load {gguf_path}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        per_seq = -(-max_len // 256) * 256
        cp = lc.llama_context_default_params()
        cp.n_ctx = per_seq * max_batch
        cp.n_batch = cp.n_ubatch = max(512, max_batch * max_len)
        cp.n_seq_max = max_batch
        cp.n_threads = cp.n_threads_batch = threads
        if exact:
            cp.type_k = cp.type_v = lc.GGML_TYPE_F32
            cp.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise MoeRtError("llama.cpp could not create a context")
        self.batch = lc.llama_batch_init(cp.n_batch, 0, max_batch)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """One llama_decode over (token, position, sequence, wants logits) entries; returns the
        logits rows [n_outputs, vocab] in entry order."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise MoeRtError(f"llama.cpp llama_decode failed with {rc}")
        n_out = sum(e[3] for e in entries)
        return np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def run(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
        """Greedy-decode max_tokens per prompt; (seconds of the decode steps, tokens per prompt)."""
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)
        entries = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        nxt = self._decode(entries).argmax(axis=1).tolist()
        out = [[t] for t in nxt]
        t0 = time.perf_counter()
        for step in range(1, max_tokens):
            logits = self._decode([(nxt[s], len(p) + step - 1, s, True) for s, p in enumerate(prompts)])
            nxt = logits.argmax(axis=1).tolist()
            for s, t in enumerate(nxt):
                out[s].append(t)
        return time.perf_counter() - t0, out

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def _quiet(level, text, user_data) -> None:
    pass


try:  # the callback object must outlive every llama.cpp call, so it lives at module level
    from llama_cpp import llama_log_callback

    _QUIET = llama_log_callback(_quiet)
except ImportError:
    _QUIET = None


def default_cache_dir() -> str:
    return os.path.expanduser("~/.cache/moe-rt/gguf")
