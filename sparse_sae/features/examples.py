"""The examples shown on a latent's page, with the context each needs: for text the tokens
around the example's row in its document, each with the latent's activation; for images every
patch of the image; for labelled rows the label. Context rows are re-encoded
(:func:`~sparse_sae.features.collect.activations_at`): a set bounded by the pages, not the data."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_sae.features.collect import LatentStats, activations_at

CONTEXT_BEFORE, CONTEXT_AFTER = 16, 4
SAMPLE_BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75))      # quantiles of a latent's activations
PER_BAND = 3


@dataclass
class Example:
    row: int
    value: float
    context: list = field(default_factory=list)   # [(row, activation)], the example's row included
    band: str = ""                                # quantile band, for the random examples


def pick_examples(stats: LatentStats, slot: int) -> tuple:
    """``(top, random)`` examples of ``slot``: the top-N, then up to :data:`PER_BAND` sampled
    entries from each band of :data:`SAMPLE_BANDS` of the sampled activations (lower quantiles)."""
    top = [Example(int(r), float(v)) for r, v in zip(stats.top.rows[slot], stats.top.values[slot]) if r >= 0]
    have = stats.sample.rows[slot] >= 0
    rows, values = stats.sample.rows[slot][have], stats.sample.values[slot][have]
    randoms = []
    if values.numel() >= 4:
        sorted_v = values.sort().values
        top_rows = {e.row for e in top}
        for lo, hi in SAMPLE_BANDS:
            vlo = sorted_v[int(lo * (values.numel() - 1))]
            vhi = sorted_v[int(hi * (values.numel() - 1))]
            # sample order is hash order: the first entries in the band are a random pick
            picked = [Example(int(r), float(v), band=f"{int(lo * 100)}-{int(hi * 100)}%")
                      for r, v in zip(rows.tolist(), values.tolist())
                      if vlo <= v < vhi and r not in top_rows][:PER_BAND]
            randoms.extend(picked)
    return top, randoms


def context_rows(sidecar, row: int) -> list:
    """The rows shown with ``row``: nearby tokens of its document, every token of its image, or itself."""
    if sidecar is None or sidecar.kind == "label":
        return [row]
    lo, hi = sidecar.group_bounds(row)
    if sidecar.kind == "text":
        lo, hi = max(lo, row - CONTEXT_BEFORE), min(hi, row + CONTEXT_AFTER + 1)
    return list(range(lo, hi))


def fill_context(sae, stats: LatentStats, pages: dict, source, sidecar, batch_size: int = 4096) -> None:
    """Sets ``context`` of every example in ``pages`` (``slot -> (top, random)``) in one batched re-encode."""
    req_rows, req_slots, owners = [], [], []
    for slot, (top, randoms) in pages.items():
        for ex in top + randoms:
            rows = context_rows(sidecar, ex.row)
            req_rows.extend(rows)
            req_slots.extend([slot] * len(rows))
            owners.append((ex, rows))
    acts = activations_at(sae, stats.latents, source, torch.tensor(req_rows, dtype=torch.int64),
                          torch.tensor(req_slots, dtype=torch.int64), batch_size).tolist()
    i = 0
    for ex, rows in owners:
        ex.context = list(zip(rows, acts[i:i + len(rows)]))
        i += len(rows)
