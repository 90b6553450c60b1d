"""A compact training loop: Adam, learning-rate warm-up and decay, gradient clipping and the
unit-norm decoder constraint, with a progress bar of live loss, FVU, L0 and dead fraction."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    warmup_steps: int = 50
    decay_start: float = 0.8       # fraction of steps after which the rate decays linearly to 0
    grad_clip: float = 1.0
    dead_after_tokens: int = 100_000
    progress: bool = True


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = int(cfg.decay_start * cfg.steps)
    if step < start:
        return cfg.lr
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - start))


def train(sae, batches: Iterator[torch.Tensor] | Callable[[int], torch.Tensor], cfg: TrainConfig,
          desc: str = "train") -> dict:
    """Trains ``sae`` in place on ``batches`` (an iterator, or a function of the step) and returns
    the final metrics and the throughput in rows per second."""
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    get = batches if callable(batches) else (lambda _step, it=iter(batches): next(it))
    bar = tqdm(range(cfg.steps), desc=desc, disable=not cfg.progress, dynamic_ncols=True, leave=False)
    rows, start = 0, time.perf_counter()
    stats = {}
    for step in bar:
        x = get(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        out = sae(x)
        if not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite loss {float(out.loss)} at step {step}; parameters left as "
                                     f"after step {step - 1}")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sae.remove_parallel_grad_()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        opt.step()
        sae.normalize_decoder_()
        rows += x.shape[0]
        if step % 25 == 0 or step == cfg.steps - 1:
            stats = {"loss": float(out.loss.detach()), "fvu": float(out.losses["recon"].detach()),
                     "l0": float((out.values > 0).sum(1).float().mean()),
                     "dead": float(sae.dead_mask(cfg.dead_after_tokens).float().mean())}
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items()})
    elapsed = time.perf_counter() - start
    stats["rows_per_s"] = rows / elapsed if elapsed > 0 else math.inf
    return stats
