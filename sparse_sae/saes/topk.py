"""The hard-budget SAEs: Top-k (each row keeps its ``k`` largest pre-activations) and
BatchTopK (the batch keeps its ``B * k`` largest), with the paper's penalties computed by the
fused ``ops.topk_code``."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from sparse_sae import ops, reference
from sparse_sae._checks import check_int
from sparse_sae.penalties import AuxK, DecoderNormL1, L1L2Ratio, OffSupportL1, Penalty
from sparse_sae.saes.base import SAEOutput, SparseAutoencoder
from sparse_sae.saes.relu import JumpReLUSAE

# The penalties whose values ``ops.topk_code`` computes with the code (from the row norms).
PAPER_TERMS = (OffSupportL1.name, L1L2Ratio.name)


def next_threshold(threshold, smallest, momentum: float):
    """BatchTopK's running threshold after a batch whose smallest positive selected value is
    ``smallest`` (``inf``: none, which leaves it unchanged); the first batch sets it (``threshold < 0``)."""
    pos = smallest.to(torch.float64)
    new = torch.where(threshold < 0, pos, (1 - momentum) * threshold + momentum * pos)
    return torch.where(torch.isfinite(pos), new, threshold)


class TopKSAE(SparseAutoencoder):
    """Top-k SAE: each row keeps its ``k`` largest pre-activations (ties to the lower index).

    Takes the paper's penalties ``OffSupportL1`` and ``L1L2Ratio`` (arXiv:2606.27321), and
    ``DecoderNormL1``; ``auxk=AuxK()`` adds the auxiliary loss on dead latents.
    """

    architecture = "topk"
    allowed_penalties = (OffSupportL1, L1L2Ratio, DecoderNormL1)
    mode = "topk"

    def __init__(self, d_in: int, n_latents: int, k: int, penalties: Sequence[Penalty] = (), *,
                 auxk: AuxK | None = None, **kwargs):
        super().__init__(d_in, n_latents, penalties, **kwargs)
        self.k = check_int(k, "k", 1, n_latents)
        if auxk is not None and not isinstance(auxk, AuxK):
            raise TypeError(f"auxk must be an AuxK or None, got {type(auxk).__name__}")
        self.auxk = auxk

    @property
    def k_aux(self) -> int:
        return 0 if self.auxk is None else self.auxk.width(self.d_in, self.n_latents)

    def _width(self) -> int:
        """The packed code's width for ``ops.select`` (0: Top-k's own ``k``)."""
        return 0

    def _ratio_eps(self) -> float:
        ratio = self.penalty(L1L2Ratio)
        return ratio.eps if ratio is not None else reference.RATIO_EPS

    def _topk_code(self, xs, dead=None, penalized: bool = False):
        """``ops.topk_code`` of the scaled input ``xs``: the code, firing counts, the paper's
        penalty values when ``penalized`` and the AuxK candidates when ``dead`` is given."""
        return ops.topk_code(*self._autocast(xs, self.W_enc, self.b_enc, self.b_dec), self.k, self.mode,
                             self._width(), dead, self.k_aux, self._ratio_eps(), penalized)

    def encode(self, x):
        code = self._topk_code(self._checked_scaled_input(x))
        return code.values, code.indices

    def forward(self, x) -> SAEOutput:
        xs = self._checked_scaled_input(x)
        dead = self.dead_mask(self.auxk.dead_after_tokens) if (self.auxk is not None and self.training) else None
        code = self._topk_code(xs, dead, penalized=any(p.name in PAPER_TERMS for p in self.penalties))
        aux = (code.aux_values, code.aux_indices, dead) if dead is not None else None
        return self._decode_with_losses(xs, code.values, code.indices, code.fired,
                                        {"off_support_l1": code.off_support_l1, "l1_l2_ratio": code.l1_l2_ratio}, aux)

    def _further_recon_losses(self, xs, values, indices, W_dec, b_dec) -> dict:
        """The terms of :meth:`recon_terms` for this code (none for Top-k itself)."""
        return {}

    def _decode_with_losses(self, xs, values, indices, fired, paper_terms: dict, aux) -> SAEOutput:
        """Decodes the code, computes every loss term and updates the firing statistics.
        ``paper_terms`` holds the penalty values that came with the code; ``aux`` is
        ``(aux_values, aux_indices, dead)`` or None."""
        W_dec, b_dec = self._autocast(self.W_dec, self.b_dec)
        recon = ops.sparse_decode(values, indices, W_dec, b_dec)
        losses = {"recon": self._recon_term(xs, recon), **self._further_recon_losses(xs, values, indices, W_dec, b_dec)}
        for p in self.penalties:
            losses[p.name] = (paper_terms[p.name] if p.name in PAPER_TERMS
                              else reference.decoder_norm_l1_ref(values, indices, self.W_dec))
        if aux is not None:
            aux_values, aux_indices, dead = aux
            e_hat = ops.sparse_decode(aux_values, aux_indices, W_dec, torch.zeros_like(b_dec))
            losses["auxk"] = reference.auxk_loss_from_residual((xs - recon).detach(), e_hat, dead.any())
        self.update_firing_stats(fired, xs.shape[0])
        return self._output(recon, losses, fired, values=values, indices=indices)

    @torch.no_grad()
    def to_jumprelu(self, data, target_l0: float | None = None, *, bandwidth: float = 1e-3,
                    batch_size: int = 4096, max_rows: int = 16384) -> JumpReLUSAE:
        """This SAE as a thresholded encoder with adaptive sparsity: a :class:`JumpReLUSAE` with the
        same weights and per-latent thresholds ``theta_j`` calibrated on ``data`` (``N x d_in``, input
        units; the first ``max_rows`` rows, which it holds as ``N x F`` pre-activations), so that the
        number of active latents varies per input while the mean stays at ``target_l0`` (default ``k``)
        on ``data``.

        Each latent keeps its share of the code: latent ``j`` fires on the calibration rows as often
        as this SAE selects it, scaled to ``target_l0`` (largest remainders make the counts sum to
        ``target_l0 * N``), and ``theta_j`` lies halfway between its ``n_j``-th and ``n_j + 1``-th
        largest pre-activation. A latent that is never selected gets a threshold above every
        calibration value. The result is in eval mode."""
        if not torch.is_tensor(data) or data.dim() != 2 or data.shape[1] != self.d_in or data.shape[0] < 1:
            raise ValueError(f"data must be a N x {self.d_in} tensor with N >= 1, got "
                             f"{tuple(data.shape) if torch.is_tensor(data) else type(data).__name__}")
        check_int(batch_size, "batch_size", 1)
        check_int(max_rows, "max_rows", 1)
        xs = self._checked_scaled_input(data[:max_rows].to(self.W_enc.device, self.W_enc.dtype))
        N, F = xs.shape[0], self.n_latents
        z = torch.cat([reference.encode_ref(xs[i:i + batch_size], self.W_enc, self.b_enc, self.b_dec, relu=False)
                       for i in range(0, N, batch_size)])
        counts = torch.zeros(F, dtype=torch.int64, device=z.device)
        for i in range(0, N, batch_size):
            h = z[i:i + batch_size].relu()
            if self.mode == "topk":
                v, idx = reference.topk_select_ref(h, self.k)
            else:
                v, idx = reference.batchtopk_select_ref(h, self.k)
            counts += reference.fired_counts_ref(v, idx, F)
        total = int(counts.sum())
        target = float(self.k) if target_l0 is None else float(target_l0)
        if not (math.isfinite(target) and 0 < target <= F):
            raise ValueError(f"target_l0 must be in (0, {F}], got {target_l0!r}")
        if total == 0:
            raise ValueError("this SAE selects no positive entry on data: nothing to calibrate")
        # per-latent counts n_j summing to round(target * N): proportional, largest remainders
        want = counts.double() * (round(target * N) / total)
        n = want.floor().to(torch.int64)
        short = round(target * N) - int(n.sum())
        if short > 0:
            n[torch.argsort(want - n.double(), descending=True, stable=True)[:short]] += 1
        n = n.clamp(max=N)
        s = torch.sort(z, dim=0, descending=True).values            # N x F, each column descending
        top = s.gather(0, (n - 1).clamp(min=0)[None]).squeeze(0)    # the n_j-th largest
        nxt = s.gather(0, n.clamp(max=N - 1)[None]).squeeze(0)      # the (n_j + 1)-th largest
        theta = torch.where(n < N, (top + nxt) / 2, top - top.abs() * 1e-3 - 1e-12)
        never = s[0] + s[0].abs() + 1.0                              # above every calibration value
        theta = torch.where(n == 0, never, theta)
        theta = torch.maximum(theta, torch.where(n > 0, top / 2, theta).clamp_min(torch.finfo(z.dtype).tiny))
        sae = JumpReLUSAE(self.d_in, F, bandwidth=bandwidth, recon_loss=self.recon_loss, input_scale=self.input_scale,
                          check_inputs=self.check_inputs, dtype=self.W_enc.dtype, device=self.W_enc.device)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(getattr(self, name))
        sae.log_threshold.copy_(theta.log())
        return sae.eval()

    def config(self) -> dict:
        cfg = super().config()
        cfg["k"] = self.k
        cfg["auxk"] = self.auxk.to_config() if self.auxk is not None else None
        return cfg


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: the ``B * k`` largest pre-activations of the whole batch are kept.

    In eval mode it applies the learned global threshold (a running estimate of the
    smallest selected value) instead, so a row's code does not depend on its batch.
    ``max_k_per_row`` caps a row's entries (a static width for graph capture); None keeps
    all of them (exact; the width is data-dependent).
    """

    architecture = "batchtopk"
    mode = "batchtopk"

    def __init__(self, d_in: int, n_latents: int, k: int, penalties: Sequence[Penalty] = (), *,
                 max_k_per_row: int | None = None, threshold_momentum: float = 0.01, **kwargs):
        super().__init__(d_in, n_latents, k, penalties, **kwargs)
        self.max_k_per_row = None if max_k_per_row is None else check_int(max_k_per_row, "max_k_per_row", 1,
                                                                           n_latents)
        if not 0 < threshold_momentum <= 1:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {threshold_momentum}")
        self.threshold_momentum = float(threshold_momentum)
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float64, device=kwargs.get("device")))

    def _width(self) -> int:
        return self.max_k_per_row or 0

    def _uses_threshold(self) -> bool:
        """In eval mode, once a threshold has been learned, rows are coded by it, not by the batch
        (one host read of the threshold; training mode never reads it)."""
        return not self.training and float(self.threshold) >= 0

    def _threshold_code(self, xs):
        """The code of ``xs`` under the learned global threshold, and its ``ops.select`` result."""
        h = ops.encode(*self._autocast(xs, self.W_enc, self.b_enc, self.b_dec))
        sel = ops.select(h.detach(), mode="threshold", width=self._width(),
                         threshold=self.threshold.to(h.dtype).expand(self.n_latents))
        return h.gather(1, sel.indices) * (sel.values > 0), sel

    def encode(self, x):
        if not self._uses_threshold():
            return super().encode(x)
        values, sel = self._threshold_code(self._checked_scaled_input(x))
        return values, sel.indices

    def forward(self, x) -> SAEOutput:
        if not self._uses_threshold():
            out = super().forward(x)
            if self.training:
                self.update_threshold_estimate(out.values)
            return out
        xs = self._checked_scaled_input(x)
        values, sel = self._threshold_code(xs)
        r_off, r_ratio = reference.penalty_values_from_norms(sel.n1, sel.n2, sel.values, self._ratio_eps())
        return self._decode_with_losses(xs, values, sel.indices, sel.fired,
                                        {"off_support_l1": r_off, "l1_l2_ratio": r_ratio}, None)

    @torch.no_grad()
    def update_threshold_estimate(self, values) -> None:
        """Running estimate of the smallest selected value, on the device (no host sync); a batch
        that selects nothing positive leaves it unchanged."""
        smallest = torch.where(values > 0, values, torch.full_like(values, float("inf"))).min()
        smallest = ops.batch_smallest(smallest)      # over the global batch (data parallelism)
        self.threshold.copy_(next_threshold(self.threshold, smallest, self.threshold_momentum))

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(max_k_per_row=self.max_k_per_row, threshold_momentum=self.threshold_momentum)
        return cfg
