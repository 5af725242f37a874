"""Shared minibatch trainer for the learned predictors (multi-label BCE over expert slots).

A model maps a batch to logits [B, P, E] over P prediction slots (e.g. layer x distance); targets are
multi-hot [B, P, E] and a mask [B, P] marks slots that exist (no layer l+d past the last layer).
Batches are built on demand from trace rows, so [N, P, E] targets are never materialised.

Shape legend: B batch rows, P prediction slots, E routed experts, k experts per token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

BatchFn = Callable[[torch.Tensor], tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # passes over the training rows
    batch_size: int = 256  # rows per optimiser step
    lr: float = 3e-3  # Adam learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    held_out: float = 0.2  # share of sequences kept out of training to report honest loss/recall
    seed: int = 0  # split, init and shuffling
    progress: bool = True  # tqdm bar over epochs


@dataclass
class TrainLog:
    held_out_loss_before: float  # held-out BCE of the untrained model
    train_loss: list[float] = field(default_factory=list)  # mean per epoch
    held_out_loss: list[float] = field(default_factory=list)  # after each epoch
    held_out_recall: float = float("nan")  # recall@k on held-out rows after training


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE over existing slots only; logits/targets [B, P, E], mask [B, P] bool."""
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(-1)  # [B, P]
    return (per * mask).sum() / mask.sum().clamp(min=1)


def masked_recall(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[int, int]:
    """(true experts inside predicted top-k, true experts) over existing slots."""
    top = logits.topk(k, dim=-1).indices
    hits = targets.gather(-1, top).sum(-1)  # [B, P]
    return int((hits * mask).sum()), int(mask.sum()) * k


def evaluate(model: torch.nn.Module, batch: BatchFn, n: int, k: int, batch_size: int) -> tuple[float, float]:
    """(mean loss, recall@k) over rows 0..n-1 of a split."""
    loss_sum, slots, hit, total = 0.0, 0, 0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            inputs, targets, mask = batch(torch.arange(start, min(n, start + batch_size)))
            logits = model(*inputs)
            loss_sum += float(masked_bce(logits, targets, mask)) * int(mask.sum())
            slots += int(mask.sum())
            h, t = masked_recall(logits, targets, mask, k)
            hit, total = hit + h, total + t
    return loss_sum / max(slots, 1), hit / max(total, 1)


def train(model: torch.nn.Module, train_batch: BatchFn, n_train: int, held_batch: BatchFn, n_held: int,
          k: int, cfg: TrainConfig, desc: str) -> TrainLog:
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log = TrainLog(evaluate(model, held_batch, n_held, k, cfg.batch_size)[0])
    bar = tqdm(range(cfg.epochs), desc=desc, disable=not cfg.progress)
    for _ in bar:
        order = torch.randperm(n_train, generator=gen)
        total, steps = 0.0, 0
        for start in range(0, n_train, cfg.batch_size):
            inputs, targets, mask = train_batch(order[start: start + cfg.batch_size])
            loss = masked_bce(model(*inputs), targets, mask)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        log.train_loss.append(total / max(steps, 1))
        held_loss, log.held_out_recall = evaluate(model, held_batch, n_held, k, cfg.batch_size)
        log.held_out_loss.append(held_loss)
        bar.set_postfix(train=f"{log.train_loss[-1]:.4f}", held=f"{held_loss:.4f}",
                        recall=f"{log.held_out_recall:.3f}")
    return log
