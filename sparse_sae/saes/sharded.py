"""Latent parallelism: a (Batch)Top-k SAE whose latents are split across the processes of a
``torch.distributed`` group, for dictionaries larger than one device holds.

Rank ``r`` of ``P`` holds the contiguous slice ``[lo, hi)`` of the ``F`` latents (``W_enc``,
``b_enc``, ``W_dec`` rows, their optimizer state, their firing counters) and ``b_dec``
(replicated). Every rank of the group sees the same batch. Per step:

- each rank runs the encoder GEMM on its slice and a local selection (the local Top-k of each
  row, or the local ``B * k`` largest for BatchTopK, with the AuxK candidates among its dead
  latents);
- the global selection is the selection among the gathered candidates (an all-gather of
  ``B x k`` values and indices per rank), with the reference's tie rule (lower global index,
  lower flat index for BatchTopK): a globally selected entry is always among its rank's local
  candidates, so the result equals one process's selection;
- the batch-active set ``A`` restricted to a slice follows from the global selection with no
  communication; the row norms ``n1``, ``n2`` over ``A`` are all-reduce sums of ``B`` numbers;
- each rank decodes its own selected entries; one all-reduce of ``B x D`` gives the
  reconstruction, identical on every rank, and so are the loss and its gradient with respect to
  the reconstruction. Every backward is then local to the rank's latents, except the encoder's
  contribution to ``dL/dx`` and ``dL/db_dec``, summed over ranks in the backward.

The result equals one process on the same batch and weights: the same selected indices, the
losses and every gradient to float rounding (``tests/test_latent_parallel.py``: 1e-12 relative
in float64 for P = 2 and 4). The slice's encoder backward is the fused ``ops.penalty_backward``
kernel with the global row norms (:class:`_ShardedCode`), as ``ops.topk_code`` runs it for a
whole SAE: no ``B x F/P`` gradient is held, and plain Top-k keeps no ``B x F/P`` tensor.

The trainer builds one per process with ``latent_parallel`` (``--latent-parallel``) on the
``data x latent`` mesh of :mod:`sparse_sae.training.distributed`. With several data replicas
BatchTopK selects over the global batch instead: the cut of every process's entries with each
row's ties (``distributed.global_batch_cut(by_row=True)``, through ``ops.batch_cut``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from sparse_sae import ops, reference
from sparse_sae._checks import check_activations, check_int, check_real
from sparse_sae.geometric_median import geometric_median
from sparse_sae.ops.topk_code import code_backward_terms
from sparse_sae.penalties import AuxK, L1L2Ratio, OffSupportL1, Penalty
from sparse_sae.saes import serialization
from sparse_sae.saes.base import (
    RECON_LOSSES,
    SAEOutput,
    TrainableSAE,
    add_sae_parameters,
    draw_init_seed,
    init_decoder_rows,
)
from sparse_sae.saes.topk import PAPER_TERMS, BatchTopKSAE, TopKSAE, next_threshold

MODES = ("topk", "batchtopk")
WHOLE_CLASSES = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}
SLICED = ("W_enc", "b_enc", "W_dec", "tokens_since_fired")    # per-latent: each rank holds rows [lo, hi)


def shard_bounds(n_latents: int, n_shards: int, shard: int) -> tuple[int, int]:
    """``[lo, hi)`` of shard ``shard``: contiguous slices, the first ``n_latents % n_shards`` one longer."""
    base, extra = divmod(n_latents, n_shards)
    lo = shard * base + min(shard, extra)
    return lo, lo + base + (1 if shard < extra else 0)


class _SumOverShards(torch.autograd.Function):
    """All-reduce sum of per-rank partials whose backward is the identity: every rank goes on with
    the same sum to the same loss, so each partial's gradient is the loss's gradient with respect
    to the sum (a differentiable all-reduce would sum the ``P`` equal gradients)."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        return g, None


def _collective_device(group) -> torch.device:
    """Where a small tensor for a collective over ``group`` must live (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_from_first(t: torch.Tensor, group) -> None:
    """``t`` on every rank of ``group`` set to the group's first rank's ``t``."""
    dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)


def run_on_every_rank(fn, group=None):
    """Calls ``fn()`` on every rank of ``group``; if it raised on any rank, raises on every rank
    (the rank's own exception where it failed) instead of leaving the others waiting in a later
    collective."""
    error = None
    try:
        result = fn()
    except Exception as exc:      # noqa: BLE001 - re-raised below, on this rank and the others
        error, result = exc, None
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=_collective_device(group))
    dist.all_reduce(failed, group=group)
    if error is not None:
        raise error
    if int(failed):
        raise RuntimeError(f"{int(failed)} other process(es) failed; see their errors")
    return result


class _ShardedCode(torch.autograd.Function):
    """One slice's code and its share of the paper's penalties, as ``ops.topk_code`` computes them
    for a whole SAE: forward takes the slice's pre-activations ``h`` and the global selection on
    it; the row norms ``n1``, ``n2`` over ``A`` and the selected sum are one all-reduce of ``3 x B``
    numbers. Backward is ``ops.penalty_backward`` on the slice with the global norms (the fused
    kernel: no ``B x F/P`` gradient is ever held), and the encoder's shares of ``dL/dx`` and
    ``dL/db_dec`` summed over the shards. Without penalties (``active`` None) nothing ``B x F/P``
    is kept for the backward."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, h, loc, keep, aux_loc, aux_keep, active, ratio_eps, group):
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        values = torch.where(keep, h.gather(1, loc), zero)
        aux_values = torch.where(aux_keep, h.gather(1, aux_loc), zero)
        acc = reference.acc_dtype(h.dtype)
        B = x.shape[0]
        if active is not None:
            hA = h.to(acc) * active
            sums = torch.stack([hA.sum(1), hA.square().sum(1), values.to(acc).sum(1)])
            dist.all_reduce(sums, group=group)
            n1, n2, picked = sums[0], sums[1].sqrt(), sums[2]
            r_off, r_ratio = reference.penalty_values_from_norms(n1, n2, picked[:, None], ratio_eps)
        else:
            n1 = n2 = torch.zeros(B, dtype=acc, device=h.device)
            r_off = r_ratio = torch.zeros((), dtype=acc, device=h.device)
        ctx.ratio_eps, ctx.group, ctx.penalized = ratio_eps, group, active is not None
        ctx.save_for_backward(x, W_enc, b_dec, h if active is not None else None, values, loc, aux_values, aux_loc,
                              active if active is not None else torch.zeros(W_enc.shape[0], dtype=torch.bool,
                                                                           device=h.device), n1, n2)
        ctx.set_materialize_grads(False)
        return values, aux_values, r_off, r_ratio

    @staticmethod
    def backward(ctx, g_values, g_aux_values, g_off, g_ratio):
        x, W_enc, b_dec, h, values, loc, aux_values, aux_loc, active, n1, n2 = ctx.saved_tensors
        if not ctx.penalized:
            g_off = g_ratio = None
        coef_off, coef_ratio, sp_indices, sp_grad = code_backward_terms(
            values, loc, aux_values, aux_loc, g_values, g_aux_values, g_off, g_ratio, n1.dtype)
        need_dx = ctx.needs_input_grad[0]
        dW_enc, db_enc, db_dec, dx = ops.penalty_backward(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad,
                                                          coef_off, coef_ratio, ctx.ratio_eps, need_dx)
        shared = torch.cat([db_dec.reshape(-1), dx.reshape(-1)])    # one all-reduce of the encoder's shares
        dist.all_reduce(shared, group=ctx.group)
        db_dec = shared[:b_dec.numel()].view_as(b_dec)
        dx = shared[b_dec.numel():].view_as(x) if need_dx else None
        return dx, dW_enc, db_enc, db_dec, None, None, None, None, None, None, None, None


def _all_gather(t: torch.Tensor, group) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _top_by_value_then_index(values, keys, n: int):
    """The ``n`` entries of each row with the largest ``values``, equal values by smaller ``keys``
    (positions into the row): a stable descending sort after an ascending sort by key."""
    by_key = torch.sort(keys, dim=-1, stable=True)
    v = values.gather(-1, by_key.indices)
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :n]
    return v.gather(-1, order), by_key.values.gather(-1, order)


class _ShardedOutput(SAEOutput):
    """``values``/``indices``: this rank's share of the code (global latent indices); ``l0()``
    counts the whole code's entries; ``fired`` is this rank's slice."""

    global_l0: torch.Tensor

    def l0(self) -> torch.Tensor:
        return self.global_l0


class ShardedTopKSAE(TrainableSAE, nn.Module):
    """A Top-k (``mode="topk"``) or BatchTopK SAE with its latents split over ``group``; see the
    module docstring. Takes ``OffSupportL1``, ``L1L2Ratio`` and ``auxk=AuxK(...)``. Build it from
    a whole SAE with :meth:`from_full`; :meth:`full_state_dict` gathers the whole SAE back."""

    allowed_penalties = (OffSupportL1, L1L2Ratio)

    def __init__(self, d_in: int, n_latents: int, k: int, penalties: Sequence[Penalty] = (), *, mode: str = "topk",
                 auxk: AuxK | None = None, recon_loss: str = "fvu", threshold_momentum: float = 0.01,
                 max_k_per_row: int | None = None, group=None, input_scale: float | None = None, dtype=None,
                 device=None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ShardedTopKSAE needs an initialised torch.distributed process group")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        self.group = group
        self.n_shards, self.shard = dist.get_world_size(group), dist.get_rank(group)
        self.d_in = check_int(d_in, "d_in", 1)
        self.n_latents = check_int(n_latents, "n_latents", self.n_shards)
        self.k = check_int(k, "k", 1, n_latents)
        self.lo, self.hi = shard_bounds(n_latents, self.n_shards, self.shard)
        if self.hi - self.lo < self.k:
            raise ValueError(f"each shard must hold at least k={k} latents; {n_latents} over {self.n_shards} "
                             f"shards gives {self.hi - self.lo}")
        self.penalties = self._check_penalties(penalties)
        if auxk is not None and not isinstance(auxk, AuxK):
            raise TypeError(f"auxk must be an AuxK or None, got {type(auxk).__name__}")
        self.auxk, self.mode, self.recon_loss = auxk, mode, recon_loss
        self.threshold_momentum = float(threshold_momentum)
        if max_k_per_row is not None and mode != "batchtopk":
            raise ValueError("max_k_per_row applies to mode='batchtopk' only")
        self.max_k_per_row = None if max_k_per_row is None else check_int(max_k_per_row, "max_k_per_row", 1,
                                                                           n_latents)
        self.input_scale = None if input_scale is None else check_real(input_scale, "input_scale", positive=True)
        self.check_finite = True
        add_sae_parameters(self, self.hi - self.lo, d_in, dtype, device)     # this rank's slice
        self.register_buffer("threshold", torch.full((), -1.0, dtype=torch.float64, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """This rank's rows of the whole SAE's initialisation (:func:`~sparse_sae.saes.base.init_decoder_rows`,
        built without the other rows): the seed is drawn as the whole SAE draws it, on the group's
        first rank, and broadcast (a collective)."""
        seed = torch.tensor([draw_init_seed()], dtype=torch.int64, device=_collective_device(self.group))
        _broadcast_from_first(seed, self.group)
        self.W_dec.copy_(init_decoder_rows(int(seed), self.lo, self.hi, self.d_in, self.W_dec.dtype, self.W_dec.device))
        self.W_enc.copy_(self.W_dec)
        for name in ("b_enc", "b_dec", "tokens_since_fired"):
            getattr(self, name).zero_()
        self.threshold.fill_(-1.0)

    @torch.no_grad()
    def init_b_dec_(self, x, max_rows: int = 32768) -> None:
        """Sets ``b_dec`` to the geometric median of (up to ``max_rows`` rows of) ``x``, as the whole
        SAE does; the group's first rank's result is broadcast, so every rank holds the same bits."""
        xs = (x * self.input_scale if self.input_scale is not None else x)[:max_rows]
        self.b_dec.copy_(geometric_median(xs.to(self.b_dec.dtype)))
        _broadcast_from_first(self.b_dec.data, self.group)

    # ------------------------------------------------------------------ whole <-> sharded
    @classmethod
    def from_full(cls, sae: TopKSAE, group=None) -> "ShardedTopKSAE":
        """This rank's shard of ``sae`` (a :class:`TopKSAE` or :class:`BatchTopKSAE`)."""
        if type(sae) not in (TopKSAE, BatchTopKSAE):
            raise TypeError(f"from_full takes a TopKSAE or BatchTopKSAE, got {type(sae).__name__}")
        kw = ({"threshold_momentum": sae.threshold_momentum, "max_k_per_row": sae.max_k_per_row}
              if isinstance(sae, BatchTopKSAE) else {})
        out = cls(sae.d_in, sae.n_latents, sae.k, sae.penalties, mode=sae.mode, auxk=sae.auxk,
                  recon_loss=sae.recon_loss, group=group, input_scale=sae.input_scale, dtype=sae.W_enc.dtype,
                  device=sae.W_enc.device, **kw)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "tokens_since_fired"):
                getattr(out, name).copy_(getattr(sae, name)[out.lo:out.hi])
            out.b_dec.copy_(sae.b_dec)
            if isinstance(sae, BatchTopKSAE):
                out.threshold.copy_(sae.threshold)
        return out.train(sae.training)

    def gather_full(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole-``F`` tensor from each rank's slice (dimension 0) of ``tensor``."""
        sizes = [b - a for a, b in (shard_bounds(self.n_latents, self.n_shards, r) for r in range(self.n_shards))]
        padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))    # all_gather wants equal sizes
        padded[:tensor.shape[0]] = tensor
        return torch.cat([part[:n] for part, n in zip(_all_gather(padded, self.group), sizes)])

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The whole SAE's state dict (as :class:`TopKSAE`/:class:`BatchTopKSAE` names it), on every rank."""
        state = {name: self.gather_full(getattr(self, name).detach())
                 for name in ("W_enc", "b_enc", "W_dec", "tokens_since_fired")}
        state["b_dec"] = self.b_dec.detach().clone()
        if self.mode == "batchtopk":
            state["threshold"] = self.threshold.clone()
        return state

    def _whole(self, device) -> TopKSAE:
        """An initialised whole SAE of this one's class and configuration on ``device``."""
        kw = ({"threshold_momentum": self.threshold_momentum, "max_k_per_row": self.max_k_per_row}
              if self.mode == "batchtopk" else {})
        return WHOLE_CLASSES[self.mode](self.d_in, self.n_latents, self.k, self.penalties, auxk=self.auxk,
                                        recon_loss=self.recon_loss, input_scale=self.input_scale,
                                        dtype=self.W_enc.dtype, device=device, **kw)

    def to_full(self) -> TopKSAE:
        """The whole SAE (a :class:`TopKSAE` or :class:`BatchTopKSAE`) on every rank (a collective;
        it must fit one device: :meth:`save` writes the shards without gathering them)."""
        sae = self._whole(self.W_enc.device)
        sae.load_state_dict(self.full_state_dict())
        return sae.train(self.training)

    # ------------------------------------------------------------------ save and load by shard
    def save(self, directory, fold_input_scale: bool = True, activations: dict | None = None) -> None:
        """Writes the SAE to ``directory`` in shards, each rank its own slice
        (``sae_weights-<rank>-of-<P>.safetensors``) and the group's first rank ``config.json`` (see
        :mod:`sparse_sae.saes.serialization`); nothing is gathered. A collective over the group; a
        failure on any rank raises on every rank. :func:`sparse_sae.load` reads it back whole,
        :meth:`load` by slices for any number of shards."""
        def write():
            state = (serialization.folded_state(self) if fold_input_scale and self.input_scale is not None
                     else self.state_dict())
            if self.mode == "topk":
                del state["threshold"]        # BatchTopK's only
            serialization.write_shard(directory, self.shard, self.n_shards, state)
            if self.shard == 0:
                with torch.random.fork_rng(devices=[]):   # building it draws an init seed: keep the RNG as it was
                    config = self._whole("meta").config()
                if fold_input_scale:
                    config["input_scale"] = None
                bounds = [shard_bounds(self.n_latents, self.n_shards, r) for r in range(self.n_shards)]
                serialization.write(directory, class_name=WHOLE_CLASSES[self.mode].__name__, dtype=self.W_enc.dtype,
                                    config=config, tensors=None, activations=activations,
                                    shards={"count": self.n_shards, "bounds": bounds, "sliced": list(SLICED)})
        run_on_every_rank(write, self.group)

    @classmethod
    def load(cls, directory, group=None, device=None) -> "ShardedTopKSAE":
        """This rank's shard of the Top-k/BatchTopK SAE saved in ``directory``, whole (:func:`sparse_sae.save`)
        or in any number of shards (:meth:`save`); only this rank's rows are read. In training mode."""
        meta = serialization.read_meta(directory)
        mode = next((m for m, c in WHOLE_CLASSES.items() if c.__name__ == meta.get("class")), None)
        if mode is None:
            raise ValueError(f"{directory} holds a {meta.get('class')}; latent parallelism takes "
                             f"{' or '.join(c.__name__ for c in WHOLE_CLASSES.values())}")
        config = dict(meta["config"])
        kw = ({"threshold_momentum": config.get("threshold_momentum", 0.01),
               "max_k_per_row": config.get("max_k_per_row")} if mode == "batchtopk" else {})
        n = config["n_latents"]
        lo, hi = shard_bounds(n, dist.get_world_size(group), dist.get_rank(group))
        meta, state, _ = serialization.read(directory, device=device, rows=(lo, hi), sliced=SLICED)
        config = meta["config"]
        out = cls(config["d_in"], n, config["k"], config["penalties"], mode=mode, auxk=config.get("auxk"),
                  recon_loss=config["recon_loss"], group=group, input_scale=config.get("input_scale"),
                  dtype=getattr(torch, meta.get("dtype", "float32")), device=device, **kw)
        if mode == "topk":
            state["threshold"] = out.threshold
        out.load_state_dict(state)
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """As ``torch.nn.utils.clip_grad_norm_`` over the whole SAE's gradients: the squared norms
        of the slices summed over the group, ``b_dec`` (replicated) counted once."""
        sq = torch.zeros((), dtype=torch.float64, device=self.b_dec.device)
        for name, p in self.named_parameters():
            if p.grad is not None and name != "b_dec":
                sq += p.grad.double().square().sum()
        dist.all_reduce(sq, group=self.group)
        if self.b_dec.grad is not None:
            sq += self.b_dec.grad.double().square().sum()
        total = sq.sqrt()
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))
        return total

    # ------------------------------------------------------------------ forward
    def _sum(self, t):
        return _SumOverShards.apply(t, self.group)

    def _global_topk(self, values, local_indices, n: int):
        """Per row, the ``n`` best of every rank's candidates (values, global indices)."""
        v = torch.cat(_all_gather(values.detach(), self.group), 1)
        i = torch.cat(_all_gather(local_indices + self.lo, self.group), 1)
        return _top_by_value_then_index(v, i, n)

    def _mine(self, indices):
        """This rank's entries of a global code: local indices (0 where not mine) and the mask."""
        mine = (indices >= self.lo) & (indices < self.hi)
        return torch.where(mine, indices - self.lo, torch.zeros_like(indices)), mine

    def _batch_select(self, h):
        """BatchTopK's global selection as a ``B x F/P`` mask of this rank's selected entries, and
        the smallest selected value (for the threshold)."""
        B, Fl = h.shape
        cut = ops.batch_cut(h, self.k, by_row=True)
        if cut is not None:         # over the data replicas too: the cut with each row's ties
            value, takes = cut
            tied = h == value
            mask = (h > value) | (tied & (tied.cumsum(1) <= takes[:, None]))
            smallest = torch.where(mask & (h > 0), h, torch.full_like(h, float("inf"))).min().reshape(1)
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=self.group)
            return mask, smallest[0]
        n = B * self.k
        flat = h.detach().reshape(-1)
        tau = torch.topk(flat, n).values[-1]           # local candidates: the reference's rule
        above, tied = flat > tau, flat == tau
        local = (above | (tied & (tied.cumsum(0) <= n - above.sum()))).nonzero().squeeze(1)
        rows, cols = local // Fl, local % Fl
        keys = rows * self.n_latents + self.lo + cols   # global flat index
        v, key = self._global_topk_flat(flat[local], keys, n)
        col = key % self.n_latents
        mine = (col >= self.lo) & (col < self.hi)
        mask = torch.zeros(B * Fl, dtype=torch.bool, device=h.device)
        mask[(key // self.n_latents)[mine] * Fl + (col[mine] - self.lo)] = True
        return mask.view(B, Fl), torch.where(v > 0, v, torch.full_like(v, float("inf"))).min()

    def _global_topk_flat(self, values, keys, n: int):
        v = torch.cat(_all_gather(values, self.group))
        kk = torch.cat(_all_gather(keys, self.group))
        return _top_by_value_then_index(v, kk, n)

    def dead_mask(self, after_tokens: int) -> torch.Tensor:
        """The whole-``F`` mask of latents silent for ``after_tokens`` rows (a collective)."""
        return self.gather_full(self.tokens_since_fired) >= after_tokens

    def forward(self, x) -> SAEOutput:
        check_activations(x, self.d_in, self.W_enc, check_finite=self.check_finite)
        x = x * self.input_scale if self.input_scale is not None else x
        B, Fl = x.shape[0], self.hi - self.lo
        xa, W_enc, b_enc, b_dec_a, W_dec = self._autocast(x, self.W_enc, self.b_enc, self.b_dec, self.W_dec)
        with torch.no_grad():      # no graph through h: _ShardedCode's backward is the fused kernel
            h = ops.encode(xa, W_enc, b_enc, b_dec_a)                     # B x F/P
        loc, keep, global_indices, l0, selected_min = self._selection(h)
        fired = reference.fired_counts_ref(h.gather(1, loc) * keep, loc, Fl)
        ratio = self.penalty(L1L2Ratio)
        # A on this slice from the global selection (over the data replicas too, in training)
        active = ops.batch_active(fired > 0) if any(p.name in PAPER_TERMS for p in self.penalties) else None
        with_auxk = self.auxk is not None and self.training
        dead = (self.tokens_since_fired >= self.auxk.dead_after_tokens) if with_auxk else None
        aux_loc, aux_keep = self._auxk_candidates(h, dead)
        values, aux_values, r_off, r_ratio = _ShardedCode.apply(
            xa, W_enc, b_enc, b_dec_a, h, loc, keep, aux_loc, aux_keep, active,
            ratio.eps if ratio else reference.RATIO_EPS, self.group)
        recon = self._sum(ops.sparse_decode(values, loc, W_dec, torch.zeros_like(b_dec_a))) + self.b_dec
        losses = {"recon": (reference.fvu_ref if self.recon_loss == "fvu" else reference.mse_ref)(x, recon)}
        terms = {OffSupportL1.name: r_off, L1L2Ratio.name: r_ratio}
        losses.update({p.name: terms[p.name] for p in self.penalties})
        if dead is not None:
            e_hat = self._sum(ops.sparse_decode(aux_values, aux_loc, W_dec, torch.zeros_like(b_dec_a)))
            any_dead = dead.any().to(torch.int32)
            dist.all_reduce(any_dead, op=dist.ReduceOp.MAX, group=self.group)
            losses["auxk"] = reference.auxk_loss_from_residual((x - recon).detach(), e_hat, any_dead.bool())
        if self.training:
            with torch.no_grad():
                self.tokens_since_fired.copy_(torch.where(fired > 0, 0, self.tokens_since_fired + B))
                if selected_min is not None:      # over the data replicas too (data parallelism)
                    selected_min = ops.batch_smallest(selected_min)
                    self.threshold.copy_(next_threshold(self.threshold, selected_min, self.threshold_momentum))
        out = _ShardedOutput(recon / self.input_scale if self.input_scale is not None else recon, None, losses,
                             fired, self.n_latents, values=values, indices=global_indices)
        out.global_l0 = l0
        out.loss = self.loss(out)
        return out

    @torch.no_grad()
    def _selection(self, h):
        """The global selection's entries on this slice: ``(loc, keep, global_indices, l0, selected_min)``
        with ``loc`` local indices (``B x width``), ``keep`` the entries this rank holds and selects,
        ``l0`` the whole code's mean row count, ``selected_min`` BatchTopK's smallest selected value
        in training (None otherwise)."""
        B, Fl = h.shape
        if self.mode == "topk":
            sel = ops.select(h, self.k, "topk", norms=False)
            g_values, global_indices = self._global_topk(sel.values, sel.indices, self.k)
            loc, mine = self._mine(global_indices)
            return loc, mine & (g_values > 0), global_indices, (g_values > 0).sum(1).float().mean(), None
        if not self.training and float(self.threshold) >= 0:       # eval: the learned threshold
            mask, selected_min = h > self.threshold.to(h.dtype), None
        else:
            mask, selected_min = self._batch_select(h)
        width = min(self.max_k_per_row or 0, Fl)     # each row's local candidates for the global width
        packed = ops.select(h * mask, mode="threshold", threshold=h.new_zeros(Fl), width=width, norms=False)
        if not self.max_k_per_row:
            keep = packed.values > 0
            n_selected = keep.sum().reshape(1)
            dist.all_reduce(n_selected, group=self.group)
            return packed.indices, keep, packed.indices + self.lo, n_selected[0].float() / B, selected_min
        # a row keeps its max_k_per_row largest selected entries: the best of the ranks' own best
        g_values, global_indices = self._global_topk(packed.values, packed.indices, self.max_k_per_row)
        loc, mine = self._mine(global_indices)
        if selected_min is not None:     # the threshold estimate sees the kept entries, as the whole SAE's
            selected_min = torch.where(g_values > 0, g_values, torch.full_like(g_values, float("inf"))).min()
        return loc, mine & (g_values > 0), global_indices, (g_values > 0).sum(1).float().mean(), selected_min

    @torch.no_grad()
    def _auxk_candidates(self, h, dead):
        """AuxK's global candidates on this slice, ``(loc, keep)`` as in :meth:`_selection` (``B x 0``
        without AuxK)."""
        if dead is None:
            empty = torch.zeros(h.shape[0], 0, dtype=torch.int64, device=h.device)
            return empty, empty.bool()
        k_aux = self.auxk.width(self.d_in, self.n_latents)
        # the candidates as reference.auxk_select_ref picks them (h >= 0: live latents sort last)
        masked = torch.where(dead, h, torch.full_like(h, -1.0))
        lv, li = reference.topk_select_ref(masked, min(k_aux, h.shape[1]))
        _, g_idx = self._global_topk(lv, li, k_aux)
        loc, mine = self._mine(g_idx)
        return loc, mine & dead[loc]

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, mode={self.mode}, "
                f"shard {self.shard}/{self.n_shards}: latents [{self.lo}, {self.hi})")
