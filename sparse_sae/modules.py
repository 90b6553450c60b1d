"""SAE modules: drop-in ``torch.nn`` modules built on the ``sparse_sae`` ops.

Every SAE has ``W_enc (F x D)``, ``b_enc (F)``, ``W_dec (F x D)`` and ``b_dec (D)``.
``sae(x)`` returns an :class:`SAEOutput`; ``sae.encode(x)`` the sparse code as
``(values, indices)``; ``sae.decode(values, indices)`` the reconstruction.
A module knows nothing of backends: the ops choose them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from sparse_sae import ops, reference
from sparse_sae._checks import check_activations, check_code, check_int
from sparse_sae.geometric_median import geometric_median
from sparse_sae.penalties import L0, AuxK, DecoderNormL1, L1L2Ratio, OffSupportL1, Penalty

RECON_LOSSES = ("fvu", "mse")


class SAEOutput:
    """What ``sae(x)`` returns.

    ``recon`` (``B x D``), ``values`` and ``indices`` (``B x k``: each row's active latents,
    descending), ``loss`` (the total), ``losses`` (unweighted terms keyed ``recon``,
    ``off_support_l1``, ``l1_l2_ratio``, ``decoder_norm_l1``, ``l0``, ``auxk``, those that
    apply), ``fired`` (``F``, rows in which each latent fired). Dense architectures build
    ``values``/``indices`` on first access; :meth:`dense_code` gives the ``B x F`` code.
    """

    def __init__(self, recon, loss, losses, fired, n_latents, values=None, indices=None, code=None):
        self.recon, self.loss, self.losses, self.fired = recon, loss, losses, fired
        self._values, self._indices, self._code, self._n_latents = values, indices, code, n_latents

    def _pack(self):
        with torch.no_grad():
            sel = ops.select(self._code.detach(), mode="threshold",
                             threshold=self._code.new_zeros(self._n_latents))
        self._values, self._indices = sel.values, sel.indices

    @property
    def values(self):
        if self._values is None:
            self._pack()
        return self._values

    @property
    def indices(self):
        if self._indices is None:
            self._pack()
        return self._indices

    def l0(self) -> torch.Tensor:
        """Mean number of active latents per row (0-d float32), from the dense code when the
        architecture has one: it never packs a dense code (which on a GPU at initialisation,
        about half of F per row, would leave the kernels)."""
        with torch.no_grad():
            code = self._code if self._code is not None else self._values
            return (code > 0).sum(1).float().mean()

    def dense_code(self):
        """The ``B x F`` code."""
        if self._code is None:
            self._code = reference.dense_code_ref(self._values, self._indices, self._n_latents)
        return self._code

    def __repr__(self):
        terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in self.losses.items())
        return f"SAEOutput(loss={float(self.loss.detach()):.4g} [{terms}], recon shape {tuple(self.recon.shape)})"


class SparseAutoencoder(nn.Module):
    """Base of every SAE: parameters, input checks, decoder constraint, save and load."""

    allowed_penalties: tuple = (DecoderNormL1,)

    def __init__(self, d_in: int, n_latents: int, penalties: Sequence[Penalty] = (), *, recon_loss: str = "fvu",
                 input_scale: float | None = None, check_inputs: bool = True, dtype=None, device=None):
        super().__init__()
        self.d_in = check_int(d_in, "d_in", 1)
        self.n_latents = check_int(n_latents, "n_latents", 1)
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        self.recon_loss = recon_loss
        if input_scale is not None:
            if isinstance(input_scale, bool) or not isinstance(input_scale, (int, float)) \
                    or not math.isfinite(input_scale) or input_scale <= 0:
                raise ValueError(f"input_scale must be a finite positive number or None, got {input_scale!r}")
            input_scale = float(input_scale)
        self.input_scale = input_scale
        self.check_inputs = check_inputs
        # whether forward checks x for NaN/Inf: a host synchronisation per call on a GPU; the
        # trainer turns it off, as its loader checks every row on the host first
        self.check_finite = True
        self.penalties = self._check_penalties(penalties)
        factory = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_in, **factory))
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
        # Training rows seen since each latent last fired; feeds AuxK and the dead fraction.
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.int64, device=device))
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    def _check_penalties(self, penalties) -> tuple:
        if isinstance(penalties, Penalty):
            penalties = (penalties,)
        penalties = tuple(penalties)
        seen = set()
        for p in penalties:
            if not isinstance(p, Penalty):
                raise TypeError(f"penalties must be Penalty objects (OffSupportL1, L1L2Ratio, DecoderNormL1, L0), "
                                f"got {type(p).__name__}")
            if not isinstance(p, self.allowed_penalties):
                allowed = ", ".join(c.__name__ for c in self.allowed_penalties)
                raise ValueError(f"{type(self).__name__} does not take {type(p).__name__}; it takes {allowed}")
            if p.name in seen:
                raise ValueError(f"penalty {type(p).__name__} given twice")
            seen.add(p.name)
        return penalties

    def penalty(self, cls):
        """The configured penalty of type ``cls``, or None."""
        return next((p for p in self.penalties if isinstance(p, cls)), None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows, the encoder tied to the decoder at init, zero biases."""
        self.W_dec.normal_()
        self.normalize_decoder_()
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.tokens_since_fired.zero_()

    # ------------------------------------------------------------------ forward helpers
    def _prepare(self, x):
        if self.check_inputs and not torch.compiler.is_compiling():
            check_activations(x, self.d_in, self.W_enc, check_finite=self.check_finite)
        return x * self.input_scale if self.input_scale is not None else x

    @staticmethod
    def _autocast(*tensors):
        """The tensors in the autocast dtype when autocast is on for their device (float32 ones
        only): autocast does not cast the inputs of ``torch.library`` custom ops, so the module
        does, and the kernels then run in bf16/fp16 with fp32 accumulation. Parameters stay
        float32 (master weights); their gradients come back through the cast in float32."""
        device = tensors[0].device.type
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return tensors
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)

    def _unscale(self, recon):
        return recon / self.input_scale if self.input_scale is not None else recon

    def _recon_term(self, xs, recon):
        if self.recon_loss == "fvu" and xs.shape[0] < 2 and not torch.compiler.is_compiling():
            raise ValueError("recon_loss='fvu' needs a batch of at least 2 rows (the batch variance of "
                             "one row is 0); use recon_loss='mse' for single rows")
        return reference.fvu_ref(xs, recon) if self.recon_loss == "fvu" else reference.mse_ref(xs, recon)

    def _total(self, losses):
        loss = losses["recon"]
        for p in self.penalties:
            loss = loss + p.coef * losses[p.name]
        return loss

    @torch.no_grad()
    def _track_firing(self, fired, batch: int) -> None:
        if self.training:
            self.tokens_since_fired.copy_(torch.where(fired > 0, 0, self.tokens_since_fired + batch))

    def dead_mask(self, after_tokens: int) -> torch.Tensor:
        """Latents that have not fired in the last ``after_tokens`` training rows."""
        return self.tokens_since_fired >= after_tokens

    # ------------------------------------------------------------------ public API
    def forward(self, x) -> SAEOutput:  # pragma: no cover - each architecture defines it
        raise NotImplementedError

    def encode(self, x):
        """The sparse code of ``x``: ``(values, indices)``, each ``B x k`` (descending value)."""
        out = self.forward(x)
        return out.values, out.indices

    def decode(self, values, indices):
        """``a @ W_dec + b_dec`` for the code ``(values, indices)``, in input units."""
        if self.check_inputs:
            check_code(values, indices, self.n_latents, self.W_dec)
        W_dec, b_dec = self._autocast(self.W_dec, self.b_dec)
        return self._unscale(ops.sparse_decode(values.to(W_dec.dtype), indices, W_dec, b_dec))

    def dense_code(self, values, indices):
        """The ``B x F`` code with ``values`` at ``indices``."""
        return reference.dense_code_ref(values, indices, self.n_latents)

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Scales every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def remove_parallel_grad_(self, eps: float = 1e-12) -> None:
        """Removes from ``W_dec.grad`` each row's component parallel to the row, so that a step
        keeps the rows near unit norm (call before the optimizer step, then normalize)."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec
        coef = (g * w).sum(1, keepdim=True) / w.square().sum(1, keepdim=True).clamp_min(eps)
        g.sub_(coef * w)

    @torch.no_grad()
    def init_b_dec_(self, x, max_rows: int = 32768) -> None:
        """Sets ``b_dec`` to the geometric median of (up to ``max_rows`` rows of) ``x``."""
        xs = self._prepare(x)[:max_rows]
        self.b_dec.copy_(geometric_median(xs.to(self.b_dec.dtype)))

    def config(self) -> dict:
        """Constructor arguments as JSON-ready values."""
        return {"d_in": self.d_in, "n_latents": self.n_latents,
                "penalties": [p.to_config() for p in self.penalties], "recon_loss": self.recon_loss,
                "input_scale": self.input_scale}

    def save(self, directory, fold_input_scale: bool = True, activations: dict | None = None) -> None:
        """Writes ``sae_weights.safetensors`` and ``config.json`` to ``directory``; see
        :func:`sparse_sae.save`."""
        from sparse_sae.serialization import save
        save(self, directory, fold_input_scale=fold_input_scale, activations=activations)

    @classmethod
    def load(cls, directory, device=None):
        from sparse_sae.serialization import load
        sae = load(directory, device=device)
        if not isinstance(sae, cls):
            raise TypeError(f"{directory} holds a {type(sae).__name__}, not a {cls.__name__}")
        return sae

    def extra_repr(self) -> str:
        pens = ", ".join(f"{type(p).__name__}({p.coef:g})" for p in self.penalties)
        return f"d_in={self.d_in}, n_latents={self.n_latents}, penalties=[{pens}]"


class TopKSAE(SparseAutoencoder):
    """Top-k SAE: each row keeps its ``k`` largest pre-activations (ties to the lower index).

    Takes the paper's penalties ``OffSupportL1`` and ``L1L2Ratio`` (arXiv:2606.27321), and
    ``DecoderNormL1``; ``auxk=AuxK()`` adds the auxiliary loss on dead latents.
    """

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
        if self.auxk is None:
            return 0
        return min(self.auxk.k_aux or max(self.d_in // 2, 1), self.n_latents)

    def _width(self) -> int:
        return self.k

    def _select_mode(self) -> str:
        return self.mode

    def forward(self, x) -> SAEOutput:
        xs = self._prepare(x)
        dead = self.dead_mask(self.auxk.dead_after_tokens) if (self.auxk is not None and self.training) else None
        ratio = self.penalty(L1L2Ratio)
        code = ops.topk_code(*self._autocast(xs, self.W_enc, self.b_enc, self.b_dec), self.k, self._select_mode(),
                             self._width() if self.mode != "topk" else 0, dead, self.k_aux,
                             ratio.eps if ratio is not None else reference.RATIO_EPS,
                             any(isinstance(p, (OffSupportL1, L1L2Ratio)) for p in self.penalties))
        aux = (code.aux_values, code.aux_indices, dead) if dead is not None else None
        return self._finish(xs, code.values, code.indices, code.fired, code.off_support_l1, code.l1_l2_ratio, aux)

    def _finish(self, xs, values, indices, fired, r_off, r_ratio, aux) -> SAEOutput:
        """Decodes, adds the loss terms and tracks firing. ``aux`` is ``(aux_values, aux_indices,
        dead)`` or None."""
        W_dec, b_dec = self._autocast(self.W_dec, self.b_dec)
        recon = ops.sparse_decode(values, indices, W_dec, b_dec)
        losses = {"recon": self._recon_term(xs, recon)}
        for p in self.penalties:
            if isinstance(p, OffSupportL1):
                losses[p.name] = r_off
            elif isinstance(p, L1L2Ratio):
                losses[p.name] = r_ratio
            else:
                losses[p.name] = reference.decoder_norm_l1_ref(values, indices, self.W_dec)
        loss = self._total(losses)
        if aux is not None:
            aux_values, aux_indices, dead = aux
            e = (xs - recon).detach()
            e_hat = ops.sparse_decode(aux_values, aux_indices, W_dec, torch.zeros_like(b_dec))
            aux = reference.fvu_ref(e, e_hat)
            losses["auxk"] = torch.where(dead.any(), aux, torch.zeros_like(aux))
            loss = loss + self.auxk.coef * losses["auxk"]
        self._track_firing(fired, xs.shape[0])
        return SAEOutput(self._unscale(recon), loss, losses, fired, self.n_latents, values=values, indices=indices)

    @torch.no_grad()
    def to_jumprelu(self, data, target_l0: float | None = None, *, bandwidth: float = 1e-3,
                    batch_size: int = 4096, max_rows: int = 16384) -> "JumpReLUSAE":
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
        xs = self._prepare(data[:max_rows].to(self.W_enc.device, self.W_enc.dtype))
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

    def forward(self, x) -> SAEOutput:
        if self.training or float(self.threshold) < 0:
            out = super().forward(x)
            if self.training:
                self._update_threshold(out.values)
            return out
        xs = self._prepare(x)
        h = ops.encode(*self._autocast(xs, self.W_enc, self.b_enc, self.b_dec))
        sel = ops.select(h.detach(), mode="threshold", width=self._width(),
                         threshold=self.threshold.to(h.dtype).expand(self.n_latents))
        values = h.gather(1, sel.indices) * (sel.values > 0)
        ratio = self.penalty(L1L2Ratio)
        r_off, r_ratio = reference.penalty_values_from_norms(sel.n1, sel.n2, sel.values,
                                                             ratio.eps if ratio is not None else reference.RATIO_EPS)
        return self._finish(xs, values, sel.indices, sel.fired, r_off, r_ratio, None)

    @torch.no_grad()
    def _update_threshold(self, values) -> None:
        """Running estimate of the smallest selected value, on the device (no host sync); a batch
        that selects nothing positive leaves it unchanged."""
        pos = torch.where(values > 0, values, torch.full_like(values, float("inf"))).min().to(torch.float64)
        m = self.threshold_momentum
        new = torch.where(self.threshold < 0, pos, (1 - m) * self.threshold + m * pos)
        self.threshold.copy_(torch.where(torch.isfinite(pos), new, self.threshold))

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(max_k_per_row=self.max_k_per_row, threshold_momentum=self.threshold_momentum)
        return cfg


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE: ``a = relu(z)``, usually trained with ``DecoderNormL1``.

    The code comes from the fused ``ops.threshold_code``: packed (``values``/``indices``, decoded
    sparsely, a sparse backward) once the code is sparse, a dense ``B x F`` code while about half
    of it is active (initialisation), chosen from a sampled density. ``code_regime`` (``"auto"``,
    ``"dense"``, ``"sparse"``) forces one (the loss and gradients are the same).
    """

    allowed_penalties = (DecoderNormL1,)
    code_regime = "auto"

    def _theta(self):
        return None

    def forward(self, x) -> SAEOutput:
        xs = self._prepare(x)
        theta = self._theta()
        # autocast does not reach custom ops: the module casts (theta too: the op takes one dtype)
        cast = self._autocast(xs, self.W_enc, self.b_enc, self.b_dec, *(() if theta is None else (theta,)))
        code = ops.threshold_code(*cast[:4], cast[4] if theta is not None else None,
                                  getattr(self, "bandwidth", 1e-3), self.code_regime)
        W_dec, b_dec = self._autocast(self.W_dec, self.b_dec)
        B = xs.shape[0]
        if code.is_dense:
            a = code.dense
            recon = a @ W_dec + b_dec
            decoded = {"code": a}
            def decoder_norm_l1():
                return (a * self.W_dec.norm(dim=1)).sum() / B
        else:
            # the inactive band entries (value 0) ride along: their dL/da moves the thresholds
            values, indices = code.values, code.indices
            if code.band_values.shape[1] > 0:
                values = torch.cat([values, code.band_values], 1)
                indices = torch.cat([indices, code.band_indices], 1)
            recon = ops.sparse_decode(values, indices, W_dec, b_dec)
            decoded = {"values": code.values, "indices": code.indices}
            def decoder_norm_l1():
                # summed by latent first (index_add_, whose backward is a gather): the gradient of
                # W_dec's norms is then a dense F-vector, the same bits for any thread count,
                # which the advanced-indexing backward of norms[indices] is not
                per_latent = values.new_zeros(self.n_latents).index_add_(0, indices.reshape(-1), values.reshape(-1))
                return (per_latent * self.W_dec.norm(dim=1)).sum() / B
        losses = {"recon": self._recon_term(xs, recon)}
        for p in self.penalties:
            losses[p.name] = decoder_norm_l1() if isinstance(p, DecoderNormL1) else code.l0
        self._track_firing(code.fired, B)
        return SAEOutput(self._unscale(recon), self._total(losses), losses, code.fired, self.n_latents, **decoded)


class JumpReLUSAE(ReLUSAE):
    """JumpReLU SAE: ``a = z * 1[z > theta_j]`` with learned thresholds ``theta = exp(log_threshold)``
    and straight-through gradients (rectangle kernel of width ``bandwidth``; GemmaScope)."""

    allowed_penalties = (L0, DecoderNormL1)

    def __init__(self, d_in: int, n_latents: int, penalties: Sequence[Penalty] = (), *, bandwidth: float = 1e-3,
                 init_threshold: float = 1e-3, **kwargs):
        if not (math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be finite and positive, got {bandwidth}")
        if not (math.isfinite(init_threshold) and init_threshold > 0):
            raise ValueError(f"init_threshold must be finite and positive, got {init_threshold}")
        self.bandwidth = float(bandwidth)
        self.init_threshold = float(init_threshold)
        super().__init__(d_in, n_latents, penalties, **kwargs)
        self.log_threshold = nn.Parameter(torch.full((n_latents,), math.log(init_threshold),
                                                     dtype=self.W_enc.dtype, device=self.W_enc.device))

    def _theta(self):
        return self.log_threshold.exp()

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(bandwidth=self.bandwidth, init_threshold=self.init_threshold)
        return cfg


ARCHITECTURES = {cls.__name__: cls for cls in (TopKSAE, BatchTopKSAE, ReLUSAE, JumpReLUSAE)}
