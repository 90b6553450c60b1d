"""The streaming pass: every row through the SAE once, keeping per tracked latent its top-N
activations, a uniform random sample of its activations, its firing count and sum, a log-scale
histogram and (with embeddings) its monosemanticity moments. Memory is ``latents x (N + sample
+ bins)``, whatever the number of rows."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from sparse_sae.eval.monosemanticity import MonosemanticityAccumulator
from sparse_sae.features.topn import StreamingTopN, sample_scores

# Histogram bins: quarter octaves from 2^-16 to 2^16 (values outside land in the end bins); fixed
# edges make the histogram one pass, and a page shows the bins below each latent's maximum.
HIST_MIN_LOG2, HIST_BINS_PER_OCTAVE, HIST_BINS = -16, 4, 128


def hist_edges() -> torch.Tensor:
    """The ``HIST_BINS + 1`` bin edges (activation values)."""
    return 2.0 ** (HIST_MIN_LOG2 + torch.arange(HIST_BINS + 1, dtype=torch.float64) / HIST_BINS_PER_OCTAVE)


def hist_bin(values: torch.Tensor) -> torch.Tensor:
    b = torch.floor((torch.log2(values.double()) - HIST_MIN_LOG2) * HIST_BINS_PER_OCTAVE)
    return b.clamp(0, HIST_BINS - 1).long()


@dataclass
class LatentStats:
    """What the pass learned about the tracked ``latents`` (slot ``i`` is latent ``latents[i]``)."""
    latents: torch.Tensor        # S, int64, ascending
    n_rows: int
    count: torch.Tensor          # S, rows in which the latent fired
    total: torch.Tensor          # S, float64 sum of its activations
    top: StreamingTopN           # top-N activations
    sample: StreamingTopN        # uniform random sample of its activations
    hist: torch.Tensor           # S x HIST_BINS counts
    ms: torch.Tensor | None      # S monosemanticity scores (NaN: undefined), with embeddings

    @property
    def density(self) -> torch.Tensor:
        return self.count.double() / max(self.n_rows, 1)

    @property
    def mean(self) -> torch.Tensor:
        """Mean activation over the rows where the latent fired (0 if it never did)."""
        return self.total / self.count.clamp(min=1)


class FeatureCollector:
    """Accumulates :class:`LatentStats` for ``latents`` of an SAE with ``n_latents`` latents."""

    def __init__(self, n_latents: int, latents: torch.Tensor, n_top: int, n_sample: int, seed: int = 0,
                 emb_dim: int | None = None):
        self.latents = torch.as_tensor(latents, dtype=torch.int64).sort().values
        s = self.latents.numel()
        self.slot_of = torch.full((n_latents,), -1, dtype=torch.int64)
        self.slot_of[self.latents] = torch.arange(s)
        self.seed, self.n_rows = seed, 0
        self.top = StreamingTopN(s, n_top)
        self.sample = StreamingTopN(s, n_sample, torch.int64)
        self.count = torch.zeros(s, dtype=torch.int64)
        self.total = torch.zeros(s, dtype=torch.float64)
        self.hist = torch.zeros(s, HIST_BINS, dtype=torch.int64)
        self.ms = MonosemanticityAccumulator(s, emb_dim) if emb_dim else None

    def nbytes(self) -> int:
        """Bytes of state held (independent of the rows streamed)."""
        own = sum(t.numel() * t.element_size() for t in (self.slot_of, self.count, self.total, self.hist))
        ms = 0 if self.ms is None else (self.ms.P.numel() + 7 * self.ms.s1.numel()) * 8
        return own + self.top.nbytes() + self.sample.nbytes() + ms

    @torch.no_grad()
    def update(self, values: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor | None = None) -> None:
        """The code (``B x w`` values and latent indices) of the next ``B`` rows in data order."""
        values, indices = values.detach().float().cpu(), indices.detach().cpu().long()
        b = values.shape[0]
        slots = self.slot_of[indices]
        keep = (slots >= 0) & (values > 0)
        rows = (torch.arange(self.n_rows, self.n_rows + b)[:, None].expand_as(indices))[keep]
        s, v = slots[keep], values[keep]
        self.top.update(s, v, rows, v)
        self.sample.update(s, sample_scores(rows, self.latents[s], self.seed), rows, v)
        self.count.index_add_(0, s, torch.ones_like(s))
        self.total.index_add_(0, s, v.double())
        self.hist.view(-1).index_add_(0, s * HIST_BINS + hist_bin(v), torch.ones_like(s))
        if self.ms is not None:
            self.ms.update(embeddings, values=torch.where(keep, values, 0.0), indices=slots.clamp(min=0))
        self.n_rows += b

    def result(self) -> LatentStats:
        ms = None
        if self.ms is not None:
            ms = self.ms.compute().cpu() if self.n_rows >= 2 else torch.full((self.latents.numel(),), torch.nan)
        return LatentStats(self.latents, self.n_rows, self.count, self.total, self.top, self.sample, self.hist, ms)


def encode_batch(sae, x: torch.Tensor):
    """``(values, indices)``: the code the SAE gives ``x`` (eval mode, no grad)."""
    out = sae(x.to(sae.W_enc.device, sae.W_enc.dtype))
    return out.values, out.indices


@torch.no_grad()
def collect(saes, latent_sets, source, *, n_top: int = 20, n_sample: int = 40, batch_size: int = 4096,
            seed: int = 0, embeddings=None, progress: bool = True) -> list:
    """One pass over ``source`` (an :class:`~sparse_sae.training.data.ActivationSource`) with every SAE of
    ``saes`` (each tracking its ``latent_sets`` entry); ``embeddings``: a source with the same
    rows, for monosemanticity. Returns one :class:`LatentStats` per SAE."""
    for sae in saes:
        if source.d != sae.d_in:
            raise ValueError(f"the data has width {source.d} but the SAE expects d_in={sae.d_in}")
    if embeddings is not None and embeddings.n_rows != source.n_rows:
        raise ValueError(f"embeddings have {embeddings.n_rows} rows but the data has {source.n_rows}; "
                         f"row n of each must describe the same input")
    collectors = [FeatureCollector(sae.n_latents, lat, n_top, n_sample, seed,
                                   embeddings.d if embeddings is not None else None)
                  for sae, lat in zip(saes, latent_sets)]
    modes = [sae.training for sae in saes]
    for sae in saes:
        sae.eval()
    try:
        for start in tqdm(range(0, source.n_rows, batch_size), desc="features", unit="batch", disable=not progress):
            stop = min(start + batch_size, source.n_rows)
            x = source.rows(start, stop)
            emb = embeddings.rows(start, stop) if embeddings is not None else None
            for sae, col in zip(saes, collectors):
                col.update(*encode_batch(sae, x), emb)
    finally:
        for sae, mode in zip(saes, modes):
            sae.train(mode)
    return [c.result() for c in collectors]


def read_rows(source, rows: torch.Tensor, max_gap: int = 64, max_span: int = 4096) -> torch.Tensor:
    """``source``'s rows at the ascending indices ``rows``: spans of nearby rows (gaps up to
    ``max_gap``, at most ``max_span`` rows) are read at once, then the rows are picked out (and
    copied: a shard slice can keep its whole shard alive)."""
    rows = rows.tolist()
    out, i = [], 0
    while i < len(rows):
        j = i
        while j + 1 < len(rows) and rows[j + 1] - rows[j] <= max_gap and rows[j + 1] - rows[i] < max_span:
            j += 1
        span = source.rows(rows[i], rows[j] + 1)
        out.append(span[torch.tensor(rows[i:j + 1]) - rows[i]])
        i = j + 1
    return torch.cat(out)


@torch.no_grad()
def activations_at(sae, latents: torch.Tensor, source, rows: torch.Tensor, slots: torch.Tensor,
                   batch_size: int = 4096) -> torch.Tensor:
    """The SAE's activation of latent ``latents[slots[i]]`` at row ``rows[i]``, for every ``i``
    (re-encoded: the context around the shown examples, a set of rows bounded by the pages)."""
    rows, slots = torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(slots, dtype=torch.int64)
    out = torch.zeros(rows.numel())
    if rows.numel() == 0:
        return out
    uniq, inverse = torch.unique(rows, return_inverse=True)
    order = torch.argsort(inverse, stable=True)          # requests grouped by their row
    slot_of = torch.full((sae.n_latents,), -1, dtype=torch.int64)
    slot_of[latents] = torch.arange(latents.numel())
    was = sae.training
    sae.eval()
    try:
        for a in range(0, uniq.numel(), batch_size):
            chunk = uniq[a:a + batch_size]
            values, indices = encode_batch(sae, read_rows(source, chunk))
            values, indices = values.float().cpu(), indices.cpu().long()
            dense = torch.zeros(len(chunk), latents.numel() + 1)      # last column: untracked latents
            dense.scatter_(1, torch.where(slot_of[indices] >= 0, slot_of[indices], latents.numel()), values)
            lo, hi = torch.searchsorted(inverse[order], torch.tensor([a, a + len(chunk)])).tolist()
            req = order[lo:hi]
            out[req] = dense[inverse[req] - a, slots[req]]
    finally:
        sae.train(was)
    return out
