"""Small-budget linear probing: how much of a label a handful of latents carries.

For each class ``c`` the latents are ranked by their mean activation on the training inputs of
class ``c``; the probe for budget ``m`` sees only the ``m`` highest-ranked latents of each class.
Two probes per budget, both L2-regularised logistic regressions fitted by full-batch L-BFGS
on standardised features:

- ``accuracy``: one multinomial probe on the union of the classes' top-``m`` latents
  (at most ``C * m`` features), accuracy on the held-out inputs;
- ``balanced_accuracy_ovr``: for each class a binary probe (class vs rest) on that class's own
  ``m`` latents, balanced accuracy on the held-out inputs, averaged over classes.
"""
from __future__ import annotations

import torch

BUDGETS = (1, 2, 4, 8, 16)


class SparseCodes:
    """``N x F`` codes held as ``values``/``indices`` (``N x w``; zero values are padding), so that
    probing a wide SAE never builds the dense ``N x F`` matrix."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, n_latents: int):
        if values.shape != indices.shape or values.dim() != 2:
            raise ValueError(f"values and indices must be matching N x w tensors, got {tuple(values.shape)} "
                             f"and {tuple(indices.shape)}")
        self.values, self.indices, self.shape = values.double(), indices.long(), (values.shape[0], n_latents)
        self.device = values.device

    def dim(self):
        return 2

    def rows(self, rows):
        return SparseCodes(self.values[rows], self.indices[rows], self.shape[1])

    def class_sums(self, labels, n_classes):
        sums = torch.zeros(n_classes, self.shape[1], dtype=torch.float64, device=self.device)
        flat = labels[:, None].expand_as(self.indices) * self.shape[1] + self.indices
        return sums.view(-1).index_add_(0, flat.reshape(-1), self.values.reshape(-1)).view(n_classes, -1)

    def columns(self, cols):
        """The dense ``N x len(cols)`` block of columns ``cols``."""
        where = torch.full((self.shape[1],), -1, dtype=torch.long, device=self.device)
        where[cols] = torch.arange(cols.numel(), device=self.device)
        pos = where[self.indices]
        keep = (pos >= 0) & (self.values != 0)
        out = torch.zeros(self.shape[0], cols.numel(), dtype=torch.float64, device=self.device)
        rows = torch.arange(self.shape[0], device=self.device)[:, None].expand_as(pos)
        out[rows[keep], pos[keep]] = self.values[keep]
        return out


def _rows(codes, rows):
    return codes.rows(rows) if isinstance(codes, SparseCodes) else codes[rows]


def _columns(codes, cols):
    return codes.columns(cols) if isinstance(codes, SparseCodes) else codes[:, cols].double()


def top_latents_per_class(codes, labels: torch.Tensor, n_classes: int, m: int) -> torch.Tensor:
    """``C x m`` latent indices: per class, the ``m`` latents with the highest mean activation on
    that class's rows (ties to the lower index). ``codes``: dense ``N x F`` or :class:`SparseCodes`."""
    if isinstance(codes, SparseCodes):
        sums = codes.class_sums(labels, n_classes)
    else:
        codes = codes.double()
        sums = torch.zeros(n_classes, codes.shape[1], dtype=codes.dtype, device=codes.device)
        sums.index_add_(0, labels, codes)
    counts = torch.bincount(labels, minlength=n_classes).clamp_min(1).to(sums.dtype)
    means = sums / counts[:, None]
    # stable sort on the negated means: equal means keep index order
    return torch.sort(-means, dim=1, stable=True).indices[:, :m]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float = 1e-3, max_iter: int = 200):
    """Multinomial logistic regression (binary when ``n_classes == 2``) minimising
    ``mean cross-entropy + l2/2 * ||W||^2`` (bias not penalised). Returns ``(W, b)``."""
    x = x.double()
    W = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W + b, y) + 0.5 * l2 * W.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def _standardise(train, test):
    mu, sd = train.mean(0), train.std(0, unbiased=False)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return (train - mu) / sd, (test - mu) / sd


def _balanced_accuracy(pred, y, n_classes):
    per = [(pred[y == c] == c).double().mean() for c in range(n_classes) if bool((y == c).any())]
    return float(torch.stack(per).mean())


@torch.no_grad()
def probe(codes, labels: torch.Tensor, budgets=BUDGETS, test_fraction: float = 0.25,
          seed: int = 0, l2: float = 1e-3) -> dict:
    """Probe accuracy against the budget ``m`` (see the module docstring). ``codes`` is ``N x F``,
    or :class:`SparseCodes`, ``labels`` ``N`` integers in ``[0, C)``; a seeded random split holds
    out ``test_fraction``."""
    if codes.dim() != 2 or labels.dim() != 1 or labels.shape[0] != codes.shape[0]:
        raise ValueError(f"codes must be N x F and labels N, got {tuple(codes.shape)} and {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    labels = labels.long().to(codes.device)
    if int(labels.min()) < 0:
        raise ValueError("labels must be non-negative integers")
    n_classes = int(labels.max()) + 1
    if n_classes < 2:
        raise ValueError("probing needs at least two classes")
    n = codes.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(codes.device)
    n_test = max(1, int(round(test_fraction * n)))
    if n - n_test < 2:
        raise ValueError(f"too few rows ({n}) to probe")
    test, train = perm[:n_test], perm[n_test:]
    tr_codes, te_codes = _rows(codes, train), _rows(codes, test)
    out = {"n_classes": n_classes, "train_rows": int(train.numel()), "test_rows": n_test, "budgets": []}
    for m in budgets:
        m_eff = min(m, codes.shape[1])
        top = top_latents_per_class(tr_codes, labels[train], n_classes, m_eff)
        feats = torch.unique(top)
        xtr_all, xte_all = _columns(tr_codes, feats), _columns(te_codes, feats)
        xtr, xte = _standardise(xtr_all, xte_all)
        W, b = fit_logistic(xtr, labels[train], n_classes, l2)
        acc = float(((xte @ W + b).argmax(1) == labels[test]).double().mean())
        bal = []
        for c in range(n_classes):
            pos = torch.searchsorted(feats, top[c])
            xtr, xte = _standardise(xtr_all[:, pos], xte_all[:, pos])
            yc_tr, yc_te = (labels[train] == c).long(), (labels[test] == c).long()
            if int(yc_tr.min()) == int(yc_tr.max()):
                continue                       # a class absent (or alone) in the training split
            W, b = fit_logistic(xtr, yc_tr, 2, l2)
            bal.append(_balanced_accuracy((xte @ W + b).argmax(1), yc_te, 2))
        out["budgets"].append({"m": m, "features": int(feats.numel()), "accuracy": acc,
                               "balanced_accuracy_ovr": sum(bal) / len(bal) if bal else float("nan")})
    return out
