"""Train the small Mixtral-style demo model shipped in ``moe_rt/demo_model/``.

The model lets moe-rt run right after install (no download) and gives routing
prediction / expert-cache research a model whose routing was actually learned.

Data: the King James Bible from Debian's ``bible-kjv`` package (public domain).
Genesis..Philemon is training text; Hebrews..Revelation (the last nine books,
about 4% of the verses) is held out for validation and routing statistics.

Usage (the shipped model was made with the command in docs/demo-model.md):
    python scripts/train_demo_model.py --out moe_rt/demo_model --steps N
    python scripts/train_demo_model.py --out moe_rt/demo_model --stats-only
    python scripts/train_demo_model.py --measure-only     # time a few steps, exit

Shape legend used below: B batch, S sequence length, T = B*S tokens,
L MoE layers, E experts per layer, K experts per token (top-k), V vocab.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
VAL_FIRST_BOOK = "Heb"  # Hebrews .. Revelation are held out
VERSE_RE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<ch>\d+):(?P<vs>\d+) (?P<text>.*)$")
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
PROMPT = "In the beginning"


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides the trained weights (recorded in training_summary.json)."""

    seed: int = 0
    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 256  # tokens per training row, BOS included
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 256  # per expert
    num_layers: int = 6
    num_heads: int = 6
    num_kv_heads: int = 2
    num_experts: int = 16
    top_k: int = 2
    max_position_embeddings: int = 512


# ----------------------------------------------------------------------------- data


def load_verses() -> tuple[list[str], list[str]]:
    """Return (train_verses, val_verses) as plain text with the references stripped."""
    if shutil.which("bible") is None:
        sys.exit(
            "error: the `bible` program is missing. Install the KJV text with\n"
            "    apt-get update && apt-get install -y bible-kjv\n"
            "(Debian/Ubuntu; needs root) and run this script again."
        )
    out = subprocess.run(
        ["bible", "-p", "/usr/lib", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    train, val, in_val = [], [], False
    for line in out.splitlines():
        m = VERSE_RE.match(line)
        if m is None:
            continue
        in_val = in_val or m["book"] == VAL_FIRST_BOOK
        (val if in_val else train).append(m["text"].strip())
    if not val or len(train) < 20000:
        sys.exit(f"error: unexpected `bible` output ({len(train)} train / {len(val)} val verses)")
    return train, val


def train_tokenizer(verses: list[str], vocab_size: int):
    """Byte-level BPE; encode() prepends <s>, decode() round-trips bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(verses, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def save_tokenizer(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": model_max_length,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def encode_stream(tok, verses: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Verses joined by newlines as one token stream, plus the offset where each verse starts."""
    nl = tok.encode("\n", add_special_tokens=False).ids
    assert len(nl) == 1, "newline must be a single token"
    ids, starts = [], []
    for enc in tok.encode_batch(verses, add_special_tokens=False):
        starts.append(len(ids))
        ids.extend(enc.ids)
        ids.extend(nl)
    return np.asarray(ids, dtype=np.int64), np.asarray(starts, dtype=np.int64)


def val_rows(stream: np.ndarray, seq_len: int, bos: int) -> torch.Tensor:
    """Non-overlapping rows [BOS, t_i .. t_{i+S-2}] covering the validation stream: (N, S)."""
    n = (len(stream) // (seq_len - 1)) * (seq_len - 1)
    body = torch.from_numpy(stream[:n]).view(-1, seq_len - 1)
    return torch.cat([torch.full((body.shape[0], 1), bos), body], dim=1)


# ----------------------------------------------------------------------------- model


def build_model(o: TrainOptions):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=o.vocab_size,
        hidden_size=o.hidden_size,
        intermediate_size=o.intermediate_size,
        num_hidden_layers=o.num_layers,
        num_attention_heads=o.num_heads,
        num_key_value_heads=o.num_kv_heads,
        head_dim=o.hidden_size // o.num_heads,
        num_local_experts=o.num_experts,
        num_experts_per_tok=o.top_k,
        max_position_embeddings=o.max_position_embeddings,
        tie_word_embeddings=True,
        router_aux_loss_coef=o.aux_loss_coef,
        output_router_logits=False,  # off at inference; training asks for the logits per call
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        sliding_window=None,
        initializer_range=0.02,
    )
    torch.manual_seed(o.seed)
    model = MixtralForCausalLM(cfg)
    return model


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, per layer then averaged.

    transformers' own load_balancing_loss_func pools all layers before balancing,
    so one layer's overload can hide behind another's underload; balancing each
    layer separately is what an expert cache needs. Equals 1.0 when perfectly even.
    """
    losses = []
    for logits in router_logits:  # (T, E)
        probs = logits.float().softmax(-1)
        num_experts = probs.shape[-1]
        top = probs.topk(top_k, dim=-1).indices
        frac_tokens = F.one_hot(top, num_experts).float().sum(1).mean(0) / top_k  # (E,)
        frac_probs = probs.mean(0)  # (E,)
        losses.append(num_experts * (frac_tokens * frac_probs).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, o: TrainOptions) -> float:
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, o: TrainOptions):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95), eps=1e-8)


def sample_batch(stream: torch.Tensor, starts: torch.Tensor, o: TrainOptions, gen: torch.Generator):
    """B rows that each start at a verse boundary, BOS first: (B, S)."""
    ok = starts[starts + o.seq_len < len(stream)]
    pick = ok[torch.randint(len(ok), (o.batch_size,), generator=gen)]
    idx = pick[:, None] + torch.arange(o.seq_len - 1)[None, :]
    bos = torch.zeros(o.batch_size, 1, dtype=torch.long)  # <s> is id 0
    return torch.cat([bos, stream[idx]], dim=1)


def train_step(model, batch, o: TrainOptions) -> tuple[float, float]:
    out = model(input_ids=batch, output_router_logits=True, use_cache=False)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, o.vocab_size).float(), batch[:, 1:].reshape(-1))
    aux = balance_loss(out.router_logits, o.top_k)
    (ce + o.aux_loss_coef * aux).backward()
    return ce.item(), aux.item()


def train(model, stream, starts, val, o: TrainOptions, ckpt_dir: Path, log_every: int = 25,
          allow_new_steps: bool = False) -> dict:
    """Run o.steps steps, resuming from ckpt_dir/last.pt if it is there.

    val: (N, S) validation rows; a fixed slice is scored every 500 steps so the
    log shows whether the model still generalises (the corpus is small).
    """
    opt = make_optimizer(model, o)
    gen = torch.Generator().manual_seed(o.seed + 1)
    stream_t, starts_t = torch.from_numpy(stream), torch.from_numpy(starts)
    step, curve, elapsed, resumes = 0, [], 0.0, []
    ckpt = ckpt_dir / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        before = {**state["options"], "steps": o.steps} if allow_new_steps else state["options"]
        if before != asdict(o):
            sys.exit(f"error: {ckpt} was made with other options; delete it or pass the same flags")
        resumes = state.get("resumes", [])
        if state["options"]["steps"] != o.steps:
            # a shorter run on a busy machine: the cosine schedule is recomputed
            # for the new length from here on (recorded in training_summary.json)
            resumes.append({"at_step": state["step"], "steps_before": state["options"]["steps"],
                            "steps_after": o.steps})
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        step, curve, elapsed = state["step"], state["curve"], state["elapsed"]
        print(f"resumed from {ckpt} at step {step}", flush=True)
    model.train()
    t0 = time.perf_counter() - elapsed
    bar = tqdm(range(step, o.steps), initial=step, total=o.steps, desc="train", mininterval=30, file=sys.stdout)
    ce_sum = aux_sum = 0.0
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, o)
        ce, aux = train_step(model, sample_batch(stream_t, starts_t, o, gen), o)
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ce_sum, aux_sum = ce_sum + ce, aux_sum + aux
        if (step + 1) % log_every == 0:
            point = {"step": step + 1, "train_loss": ce_sum / log_every, "aux_loss": aux_sum / log_every,
                     "lr": lr_at(step, o), "elapsed_s": round(time.perf_counter() - t0, 1)}
            curve.append(point)
            bar.set_postfix(loss=f"{point['train_loss']:.3f}", aux=f"{point['aux_loss']:.3f}")
            print(json.dumps(point), flush=True)
            ce_sum = aux_sum = 0.0
        if (step + 1) % 500 == 0 or step + 1 == o.steps:
            vloss = run_validation(model, val[:32])[0]
            model.train()
            curve.append({"step": step + 1, "val_loss_32_rows": vloss})
            print(json.dumps(curve[-1]), flush=True)
        if (step + 1) % 250 == 0 or step + 1 == o.steps:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"options": asdict(o), "model": model.state_dict(), "opt": opt.state_dict(),
                        "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "step": step + 1,
                        "curve": curve, "elapsed": time.perf_counter() - t0, "resumes": resumes}, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)  # never leave a half-written checkpoint
    return {"steps": o.steps, "wall_time_s": round(time.perf_counter() - t0, 1), "schedule_changes": resumes,
            "curve": curve}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def run_validation(model, rows: torch.Tensor, batch: int = 16):
    """Mean next-token loss over the rows and each layer's top-K routing: (L, T, K) and probs (L, T, E)."""
    model.eval()
    nll, count, tops, probs = 0.0, 0, [], []
    for i in range(0, len(rows), batch):
        x = rows[i : i + batch]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        nll += F.cross_entropy(out.logits[:, :-1].float().reshape(-1, out.logits.shape[-1]),
                               x[:, 1:].reshape(-1), reduction="sum").item()
        count += x[:, 1:].numel()
        p = torch.stack([lg.float().softmax(-1) for lg in out.router_logits])  # (L, T, E)
        probs.append(p)
        tops.append(p.topk(model.config.num_experts_per_tok, dim=-1).indices)
    return nll / count, torch.cat(tops, 1), torch.cat(probs, 1)


def unigram_loss(train_stream: np.ndarray, val_targets: np.ndarray, vocab: int) -> float:
    """Cross-entropy of an add-one unigram model of the train tokens on the validation targets."""
    counts = np.bincount(train_stream, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_targets].mean())


def recall_at_k(pred: np.ndarray, actual: np.ndarray) -> float:
    """Mean fraction of the actual top-K found in the predicted K: both (T, K)."""
    hits = (pred[:, :, None] == actual[:, None, :]).any(1).sum(1)
    return float(hits.mean() / actual.shape[1])


def cross_layer_stats(fit_top: np.ndarray, eval_top: np.ndarray, num_experts: int) -> list[dict]:
    """For each layer pair (l, l+1): recall@K of predicting l+1's experts.

    fit_top / eval_top: (L, T, K) expert ids. Co-occurrence counts are fitted on
    fit_top (training text) and scored on eval_top (validation text), so no
    prediction has seen the tokens it is scored on.
      * transition: score e' by sum over e in layer-l top-K of C[e, e'].
      * frequency:  always predict layer l+1's K most used experts.
    """
    L, _, K = fit_top.shape
    out = []
    for l in range(L - 1):
        onehot_l = np.zeros((fit_top.shape[1], num_experts))
        np.put_along_axis(onehot_l, fit_top[l], 1.0, axis=1)
        onehot_n = np.zeros_like(onehot_l)
        np.put_along_axis(onehot_n, fit_top[l + 1], 1.0, axis=1)
        trans = onehot_l.T @ onehot_n  # (E, E) co-occurrence counts
        freq = onehot_n.sum(0)
        ev_l = np.zeros((eval_top.shape[1], num_experts))
        np.put_along_axis(ev_l, eval_top[l], 1.0, axis=1)
        scores = ev_l @ trans + 1e-6 * freq  # frequency breaks ties
        pred_t = np.argsort(-scores, axis=1, kind="stable")[:, :K]
        pred_f = np.broadcast_to(np.argsort(-freq, kind="stable")[:K], pred_t.shape)
        out.append({"pair": [l, l + 1], "recall_transition": recall_at_k(pred_t, eval_top[l + 1]),
                    "recall_frequency": recall_at_k(pred_f, eval_top[l + 1]), "transition_counts": trans})
    return out


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def routing_stats(val_top, val_probs, fit_top, num_experts: int) -> dict:
    L, T, K = val_top.shape
    load = np.stack([np.bincount(val_top[l].ravel(), minlength=num_experts) / (T * K) for l in range(L)])
    mean_probs = val_probs.mean(1)  # (L, E)
    token_entropy = -(val_probs.clamp_min(1e-12).log() * val_probs).sum(-1).mean(1)  # (L,)
    pairs = cross_layer_stats(fit_top, val_top, num_experts)
    return {
        "tokens": T,
        "load": load,
        "load_max_over_mean": (load.max(1) * num_experts).tolist(),
        "load_min_over_mean": (load.min(1) * num_experts).tolist(),
        "entropy_mean_routing": [entropy(mean_probs[l].numpy()) for l in range(L)],
        "entropy_mean_routing_normalized": [entropy(mean_probs[l].numpy()) / math.log(num_experts) for l in range(L)],
        "entropy_load_normalized": [entropy(load[l]) / math.log(num_experts) for l in range(L)],
        "entropy_per_token_normalized": (token_entropy / math.log(num_experts)).tolist(),
        "pairs": pairs,
    }


def plot_routing(stats: dict, img_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    load = stats["load"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    im = ax.imshow(load * load.shape[1], aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(load.shape[1]))
    ax.set_yticks(range(load.shape[0]))
    ax.set_title("Demo model: load per expert (1.0 = even share), validation text")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(img_dir / "demo-expert-load.png", dpi=110)
    plt.close(fig)

    # show the most predictable pair: the one a prefetcher would profit from most
    best = max(stats["pairs"], key=lambda p: p["recall_transition"] - p["recall_frequency"])
    trans = best["transition_counts"]
    trans = trans / np.maximum(trans.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    im = ax.imshow(trans, cmap="magma")
    l, n = best["pair"]
    ax.set_xlabel(f"expert in layer {n}")
    ax.set_ylabel(f"expert in layer {l}")
    ax.set_title(f"P(layer {n} expert | layer {l} expert), train text")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(img_dir / "demo-transitions.png", dpi=110)
    plt.close(fig)
    return f"{l}->{n}"


def continuations(model, tok, seed: int) -> dict:
    ids = torch.tensor([tok.encode(PROMPT).ids])
    model.eval()
    greedy = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=2)
    torch.manual_seed(seed)
    sampled = model.generate(ids, max_new_tokens=48, do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=2)
    return {"prompt": PROMPT,
            "greedy": tok.decode(greedy[0].tolist(), skip_special_tokens=True),
            "sampled_t0.8_p0.95": tok.decode(sampled[0].tolist(), skip_special_tokens=True)}


def compute_stats(out: Path, seed: int, img_dir: Path) -> dict:
    """Validation loss, unigram baseline, samples and routing statistics of the folder's model."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    train_v, val_v = load_verses()
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    train_stream, _ = encode_stream(tok, train_v)
    val_stream, _ = encode_stream(tok, val_v)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    cfg = model.config
    rows = val_rows(val_stream, 256, bos=0)
    val_loss, val_top, val_probs = run_validation(model, rows)
    uni = unigram_loss(train_stream, rows[:, 1:].reshape(-1).numpy(), cfg.vocab_size)
    # fit the cross-layer predictor on as many training tokens as there are validation tokens
    g = np.random.default_rng(seed)
    fit_rows = val_rows(train_stream, 256, bos=0)
    fit_rows = fit_rows[np.sort(g.choice(len(fit_rows), size=min(len(rows), len(fit_rows)), replace=False))]
    _, fit_top, _ = run_validation(model, fit_rows)
    stats = routing_stats(val_top.numpy(), val_probs, fit_top.numpy(), cfg.num_local_experts)
    plotted = plot_routing(stats, img_dir)
    result = {
        "validation_books": f"{VAL_FIRST_BOOK}..Rev",
        "train_tokens": int(len(train_stream)),
        "val_tokens_scored": int(rows[:, 1:].numel()),
        "val_loss": val_loss,
        "val_perplexity": math.exp(val_loss),
        "unigram_val_loss": uni,
        "unigram_val_perplexity": math.exp(uni),
        "samples": continuations(model, tok, seed),
        "routing": {
            **{k: v for k, v in stats.items() if k not in ("load", "pairs")},
            "load_per_expert": np.round(stats["load"], 4).tolist(),
            "cross_layer_recall_at_k": [
                {k: v for k, v in p.items() if k != "transition_counts"} for p in stats["pairs"]
            ],
            "random_recall_at_k": cfg.num_experts_per_tok / cfg.num_local_experts,
            "transition_heatmap_pair": plotted,
        },
    }
    return result


# ----------------------------------------------------------------------------- main


def save_model(model, tok, out: Path, o: TrainOptions) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, do_sample=False,
                     max_new_tokens=64).save_pretrained(out)
    save_tokenizer(tok, out, o.max_position_embeddings)


def parse_args() -> tuple[argparse.Namespace, TrainOptions]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "moe_rt" / "demo_model")
    ap.add_argument("--ckpt-dir", type=Path, default=Path("/tmp/moe_rt_demo_ckpt"))
    ap.add_argument("--images", type=Path, default=REPO / "docs" / "images")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--stats-only", action="store_true", help="only recompute training_summary stats of --out")
    ap.add_argument("--allow-new-steps", action="store_true",
                    help="resume a checkpoint made with another --steps (the schedule is recomputed)")
    ap.add_argument("--measure-only", type=int, default=0, metavar="N", help="time N training steps and exit")
    for f in TrainOptions.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = ap.parse_args()
    opts = TrainOptions(**{k: getattr(args, k) for k in TrainOptions.__dataclass_fields__})
    return args, opts


def main() -> None:
    args, o = parse_args()
    torch.set_num_threads(args.threads)
    summary_path = args.out / "training_summary.json"
    if args.stats_only:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        summary["evaluation"] = compute_stats(args.out, o.seed, args.images)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary["evaluation"], indent=2))
        return

    torch.manual_seed(o.seed)
    train_v, val_v = load_verses()
    print(f"verses: {len(train_v)} train, {len(val_v)} validation ({VAL_FIRST_BOOK}..Rev)", flush=True)
    tok = train_tokenizer(train_v, o.vocab_size)
    stream, starts = encode_stream(tok, train_v)
    print(f"train tokens: {len(stream)}", flush=True)
    model = build_model(o)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params}", flush=True)

    if args.measure_only:
        gen = torch.Generator().manual_seed(o.seed + 1)
        opt = make_optimizer(model, o)
        times = []
        for _ in range(args.measure_only):
            t = time.perf_counter()
            train_step(model, sample_batch(torch.from_numpy(stream), torch.from_numpy(starts), o, gen), o)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        print(f"step times (s): {[round(x, 3) for x in times]}; median after warm-up "
              f"{float(np.median(times[1:])):.3f}", flush=True)
        return

    val = val_rows(encode_stream(tok, val_v)[0], o.seq_len, bos=0)
    result = train(model, stream, starts, val, o, args.ckpt_dir, allow_new_steps=args.allow_new_steps)
    save_model(model, tok, args.out, o)
    size = (args.out / "model.safetensors").stat().st_size
    summary = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "options": asdict(o),
        "threads": args.threads,
        "parameters": n_params,
        "active_parameters_per_token": n_params - o.num_layers * (o.num_experts - o.top_k)
        * 3 * o.hidden_size * o.intermediate_size,
        "model_safetensors_bytes": size,
        "train_verses": len(train_v),
        "val_verses": len(val_v),
        "tokens_seen": o.steps * o.batch_size * (o.seq_len - 1),
        "torch": torch.__version__,
        **result,
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    summary["evaluation"] = compute_stats(args.out, o.seed, args.images)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["evaluation"], indent=2), flush=True)


if __name__ == "__main__":
    main()
