"""Reference math of sparse_sae: every formula of DESIGN.md section 2, in plain PyTorch.

This module is the oracle. Kernels are tested against it, and the ``reference`` backend
runs it. It favours readability over speed; where a formula is differentiable, plain
autograd through it gives the gradient every backend must match.

Shapes: ``x`` is ``B x D``; ``W_enc`` and ``W_dec`` are ``F x D``; ``b_enc`` is ``F``;
``b_dec`` is ``D``; ``values`` and ``indices`` are ``B x k`` (one row's selected latents,
in descending value, ties to the lower index).
"""
from __future__ import annotations

import torch

# Default epsilon of the l1/l2 ratio's denominator ``||h_i[A]||_2 + eps``.
RATIO_EPS = 1e-6


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for reductions over ``dtype`` data: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------
def encode_ref(x, W_enc, b_enc, b_dec, relu: bool = True):
    """``z = (x - b_dec) @ W_enc.T + b_enc``; returns ``relu(z)`` (or ``z`` when ``relu`` is False)."""
    z = (x - b_dec) @ W_enc.T + b_enc
    return torch.relu(z) if relu else z


def encoder_grads_ref(G, x, W_enc, b_dec, need_dx: bool = True):
    """Gradients of the encoder from ``G = dL/dz`` (``B x F``).

    ``dW_enc = G.T @ (x - b_dec)``, ``db_enc = colsum(G)``, the encoder's share of
    ``db_dec = -colsum(G) @ W_enc`` and ``dx = G @ W_enc`` (None unless ``need_dx``).
    """
    G = G.to(W_enc.dtype)
    db_enc = G.sum(0)
    dW_enc = G.T @ (x - b_dec)
    db_dec = -(db_enc @ W_enc)
    dx = G @ W_enc if need_dx else None
    return dW_enc, db_enc, db_dec, dx


# ----------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------
def topk_select_ref(h, k: int):
    """Per row, the ``k`` largest entries of ``h``: ``(values, indices)``, each ``B x k``.

    Ties go to the lower index; entries come out in descending value, equal values by
    ascending index. Rows with fewer than ``k`` positive entries also select zeros.
    """
    B, F = h.shape
    tau = torch.topk(h, k, dim=1).values[:, -1:]           # the k-th largest value of each row
    above = h > tau
    tied = h == tau
    n_tied_needed = k - above.sum(1, keepdim=True)
    selected = above | (tied & (tied.cumsum(1) <= n_tied_needed))
    indices = selected.nonzero()[:, 1].view(B, k)          # ascending index order
    return _sort_desc(h.gather(1, indices), indices)


def batchtopk_select_ref(h, k: int, width: int = 0, cut=None):
    """BatchTopK: the ``B * k`` largest entries of the whole batch (ties to the lower flat index).

    Returns each row's selected entries packed into ``B x width`` (descending value, padded
    with zero values); ``width = 0`` means the exact width, the largest row count. ``cut``
    (``(value, ties)``, float64) gives the selection instead: every entry above ``value`` and
    the first ``ties`` entries equal to it, in flat order (a process's share of the selection
    over a data-parallel global batch).
    """
    B, F = h.shape
    flat = h.reshape(-1)
    if cut is None:
        n = B * k
        tau = torch.topk(flat, n).values[-1]
        above = flat > tau
        ties = n - above.sum()
    else:
        tau = cut[0].to(h.dtype)
        above = flat > tau
        ties = int(cut[1])
    tied = flat == tau
    selected = above | (tied & (tied.cumsum(0) <= ties))
    return pack_selected_ref(h, selected.view(B, F), width)


def threshold_select_ref(h, threshold, width: int = 0):
    """Entries with ``h_ij > threshold_j`` (JumpReLU, and BatchTopK at inference), packed like
    :func:`batchtopk_select_ref`. ``threshold`` is ``F`` (or a scalar tensor)."""
    return pack_selected_ref(h, h > threshold, width)


def pack_selected_ref(h, selected, width: int = 0):
    """Packs a ``B x F`` selection mask into ``(values, indices)`` of ``B x width``.

    Each row's selected entries come first in descending value (ties: lower index), then
    padding with value 0 at unselected indices. Entries past ``width`` are dropped;
    ``width = 0`` uses the largest row count (at least 1).
    """
    B, F = h.shape
    if width <= 0:
        width = max(int(selected.sum(1).max()), 1)
    width = min(width, F)
    key = torch.where(selected, h, torch.full_like(h, float("-inf")))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :width].contiguous()
    keep = selected.gather(1, order)
    values = torch.where(keep, h.gather(1, order), torch.zeros((), dtype=h.dtype, device=h.device))
    return values, order


def _sort_desc(values, indices):
    """Sorts each row by descending value; a stable sort keeps equal values in index order."""
    indices, perm = torch.sort(indices, dim=1)
    values = values.gather(1, perm)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


def auxk_select_ref(h, dead, k_aux: int):
    """AuxK candidates: per row, the ``k_aux`` largest entries of ``h`` among dead latents.

    ``dead`` is an ``F`` bool mask. Picks that are not dead (a row with fewer than ``k_aux``
    dead latents) or not positive get value 0.
    """
    masked = torch.where(dead, h, torch.full_like(h, -1.0))  # h >= 0, so live latents sort last
    values, indices = topk_select_ref(masked, k_aux)
    return values.clamp_min(0), indices


# ----------------------------------------------------------------------------------------
# Selection statistics
# ----------------------------------------------------------------------------------------
def fired_counts_ref(values, indices, n_latents: int):
    """Per latent, the number of rows where it was selected with a positive value (int64)."""
    counts = torch.zeros(n_latents, dtype=torch.int64, device=values.device)
    return counts.index_add_(0, indices.reshape(-1), (values > 0).reshape(-1).to(torch.int64))


def batch_active_ref(values, indices, n_latents: int):
    """The batch-active set ``A = {j : a_ij > 0 for some i}`` as an ``F`` bool mask."""
    return fired_counts_ref(values, indices, n_latents) > 0


def active_row_norms_ref(h, active):
    """Row norms over the batch-active units: ``n1_i = ||h_i[A]||_1``, ``n2_i = ||h_i[A]||_2``."""
    hA = h.to(acc_dtype(h.dtype)) * active
    return hA.sum(1), hA.square().sum(1).sqrt()


def row_threshold_ref(values):
    """Each row's threshold: its smallest selected value (0 for a row that selects nothing)."""
    if values.shape[1] == 0:
        return values.new_zeros(values.shape[0])
    return values.min(1).values.clamp_min(0)


# ----------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------
def dense_code_ref(values, indices, n_latents: int):
    """The ``B x F`` code ``a`` with ``a[i, indices[i, j]] = values[i, j]``."""
    a = values.new_zeros(values.shape[0], n_latents)
    return a.scatter_add(1, indices, values)


def sparse_decode_ref(values, indices, W_dec, b_dec):
    """``x_hat = a @ W_dec + b_dec`` with ``a`` given sparsely by ``(values, indices)``."""
    return dense_code_ref(values, indices, W_dec.shape[0]) @ W_dec + b_dec


def sparse_decode_backward_ref(grad, values, indices, W_dec):
    """``(d_values, dW_dec)`` of :func:`sparse_decode_ref` for upstream ``grad`` (``B x D``)."""
    d_values = (grad @ W_dec.T).gather(1, indices)
    dW_dec = dense_code_ref(values, indices, W_dec.shape[0]).T @ grad
    return d_values, dW_dec


# ----------------------------------------------------------------------------------------
# Reconstruction losses
# ----------------------------------------------------------------------------------------
def fvu_ref(x, x_hat):
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2``."""
    x32, xh32 = x.to(acc_dtype(x.dtype)), x_hat.to(acc_dtype(x.dtype))
    total = (x32 - x32.mean(0)).square().sum()
    return (x32 - xh32).square().sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def mse_ref(x, x_hat):
    """Mean squared error over all elements."""
    return (x.to(acc_dtype(x.dtype)) - x_hat.to(acc_dtype(x.dtype))).square().mean()


# ----------------------------------------------------------------------------------------
# Penalties (each returns the unweighted value; the module multiplies by its coefficient)
# ----------------------------------------------------------------------------------------
def support_mask_ref(indices, n_latents: int, selected=None):
    """``B x F`` bool mask of each row's support ``S_i``: the entries at ``indices`` for which
    ``selected`` (``B x k`` bool; default all) holds. Padding of a packed code is not selected."""
    mask = torch.zeros(indices.shape[0], n_latents, dtype=torch.bool, device=indices.device)
    src = torch.ones_like(indices, dtype=torch.bool) if selected is None else selected
    return mask.scatter_(1, indices, src)


def off_support_l1_ref(h, support, active):
    """``R_off = (1/B) sum_i sum_{j in A, j not in S_i} h_ij`` for a ``B x F`` support mask
    (differentiable in ``h``)."""
    off = active & ~support
    return (h.to(acc_dtype(h.dtype)) * off).sum() / h.shape[0]


def l1_l2_ratio_ref(h, active, eps: float = RATIO_EPS):
    """``R_ratio = (1/B) sum_i ||h_i[A]||_1 / (||h_i[A]||_2 + eps)``; a row with ``h_i[A] = 0``
    contributes 0 and no gradient (differentiable in ``h``)."""
    hA = h.to(acc_dtype(h.dtype)) * active
    n1 = hA.sum(1)
    sq = hA.square().sum(1)
    alive = sq > 0
    n2 = torch.where(alive, sq, torch.ones_like(sq)).sqrt()   # keeps sqrt's gradient finite at 0
    ratio = torch.where(alive, n1 / (n2 + eps), torch.zeros_like(n1))
    return ratio.sum() / h.shape[0]


def penalty_values_from_norms(n1, n2, values, eps: float = RATIO_EPS):
    """``(R_off, R_ratio)`` from the row norms over ``A`` and the selected values: every positive
    selected entry is batch active, so ``R_off = (1/B) sum_i (n1_i - sum_j values_ij)``.
    Equal to :func:`off_support_l1_ref` and :func:`l1_l2_ratio_ref`, without a ``B x F`` pass."""
    B = n1.shape[0]
    r_off = (n1 - values.to(n1.dtype).sum(1)).sum() / B
    alive = n2 > 0
    ratio = torch.where(alive, n1 / (torch.where(alive, n2, torch.ones_like(n2)) + eps), torch.zeros_like(n1))
    return r_off, ratio.sum() / B


def decoder_norm_l1_ref(values, indices, W_dec):
    """``(1/B) sum_i sum_j a_ij ||W_dec[j]||`` over the sparse code (differentiable)."""
    norms = W_dec.norm(dim=1)
    return (values * norms[indices]).sum() / values.shape[0]


def penalty_grad_ref(h, active, n1, n2, coef_off=None, coef_ratio=None, eps: float = RATIO_EPS):
    """The dense part of the penalty gradient with respect to ``z`` (``B x F``, float32/64).

    ``G_ij = [h_ij > 0][j in A] (coef_off + coef_ratio (1/(n2_i + eps) - n1_i h_ij / (n2_i (n2_i + eps)^2)))``,
    the exact derivative of ``coef_off * sum h[A] + coef_ratio * sum_i n1_i / (n2_i + eps)``.
    The off-support l1 excludes the support; the caller subtracts ``coef_off`` there.
    ``coef_*`` are scalars (tensors) already divided by ``B``, or None for an absent term.
    """
    hf = h.to(n1.dtype)
    mask = (hf > 0) & active
    G = torch.zeros_like(hf)
    if coef_off is not None:
        G = G + coef_off
    if coef_ratio is not None:
        alive = n2 > 0
        n2s = torch.where(alive, n2, torch.ones_like(n2))
        inv = torch.where(alive, 1.0 / (n2s + eps), torch.zeros_like(n2))
        scale = torch.where(alive, n1 / (n2s * (n2s + eps) ** 2), torch.zeros_like(n2))
        G = G + coef_ratio * (inv[:, None] - scale[:, None] * hf)
    return G * mask


def penalty_backward_ref(x, W_enc, b_dec, h, active, n1, n2, sp_indices, sp_grad,
                         coef_off=None, coef_ratio=None, eps: float = RATIO_EPS, need_dx: bool = False):
    """Encoder gradients from ``G = G_pen + G_sparse``.

    ``G_pen`` is :func:`penalty_grad_ref` (none when ``h`` is None: no penalty term); ``G_sparse`` holds ``sp_grad[i, j]`` (``dL/dz``,
    already zero where ``h = 0``) at column ``sp_indices[i, j]``, duplicates summed.
    Returns ``(dW_enc, db_enc, db_dec, dx)``.
    """
    if h is None:   # no penalty term: the sparse part alone
        G = torch.zeros(x.shape[0], W_enc.shape[0], dtype=n1.dtype, device=x.device)
    else:
        G = penalty_grad_ref(h, active, n1, n2, coef_off, coef_ratio, eps)
    G = G.scatter_add(1, sp_indices, sp_grad.to(G.dtype))
    return encoder_grads_ref(G, x, W_enc, b_dec, need_dx)


# ----------------------------------------------------------------------------------------
# JumpReLU and the L0 penalty with straight-through estimators (GemmaScope convention)
# ----------------------------------------------------------------------------------------
def rectangle(u):
    """The rectangle kernel ``K(u) = 1[|u| < 1/2]``."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``a = z * 1[z > theta]``; d/dz = 1[z > theta], d/dtheta = -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dz = grad * (z > theta)
        dtheta = (-(theta / eps) * rectangle((z - theta) / eps) * grad).sum(0)
        return dz, dtheta, None


class _Step(torch.autograd.Function):
    """``H(z - theta)``; d/dz = 0, d/dtheta = -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        dtheta = (-(1.0 / eps) * rectangle((z - theta) / eps) * grad).sum(0)
        return torch.zeros_like(z), dtheta, None


def jumprelu_ref(z, theta, bandwidth: float):
    """JumpReLU activation ``z * 1[z > theta]`` with the straight-through threshold gradient."""
    return _JumpReLU.apply(z, theta, bandwidth)


def l0_ref(z, theta, bandwidth: float):
    """``(1/B) sum_ij H(z_ij - theta_j)`` with the straight-through threshold gradient."""
    return _Step.apply(z, theta, bandwidth).sum() / z.shape[0]


# ----------------------------------------------------------------------------------------
# AuxK (Gao et al. 2024)
# ----------------------------------------------------------------------------------------
def auxk_loss_ref(x, recon, aux_values, aux_indices, W_dec, any_dead):
    """The dead latents' top-k_aux code reconstructs the residual ``e = x - recon`` (detached):
    ``||e - e_hat||^2 / ||e - mean(e)||^2``, 0 when no latent is dead.

    The gradient reaches ``W_dec`` and, through ``aux_values``, the encoder.
    """
    e = (x - recon).detach()
    return auxk_loss_from_residual(e, dense_code_ref(aux_values, aux_indices, W_dec.shape[0]) @ W_dec, any_dead)


def auxk_loss_from_residual(e, e_hat, any_dead):
    """AuxK's loss once the residual ``e`` and its reconstruction ``e_hat`` by the dead latents
    are known (the modules decode ``e_hat`` sparsely): ``fvu(e, e_hat)``, 0 when nothing is dead."""
    loss = fvu_ref(e, e_hat)
    return torch.where(any_dead, loss, torch.zeros_like(loss))


# ----------------------------------------------------------------------------------------
# The whole regularized Top-k forward, by dense autograd: the oracle of the module tests
# ----------------------------------------------------------------------------------------
def topk_sae_loss_ref(x, W_enc, b_enc, W_dec, b_dec, k: int, *, mode: str = "topk", width: int = 0,
                      coef_off: float = 0.0, coef_ratio: float = 0.0, coef_decnorm: float = 0.0,
                      ratio_eps: float = RATIO_EPS, dead=None, k_aux: int = 0, coef_auxk: float = 0.0,
                      recon_loss: str = "fvu"):
    """Loss of a (Batch)Top-k SAE by plain autograd through dense formulas.

    Returns ``(loss, losses, recon, values, indices)``; ``losses`` holds the unweighted terms.
    """
    h = encode_ref(x, W_enc, b_enc, b_dec)
    with torch.no_grad():
        if mode == "topk":
            picked, indices = topk_select_ref(h, k)
        else:
            picked, indices = batchtopk_select_ref(h, k, width)
    values = h.gather(1, indices) * (picked > 0)   # padding and zero picks carry nothing
    recon = sparse_decode_ref(values, indices, W_dec, b_dec)
    active = batch_active_ref(values.detach(), indices, W_dec.shape[0])
    losses = {"recon": fvu_ref(x, recon) if recon_loss == "fvu" else mse_ref(x, recon)}
    loss = losses["recon"]
    if coef_off:
        support = support_mask_ref(indices, h.shape[1], picked > 0)
        losses["off_support_l1"] = off_support_l1_ref(h, support, active)
        loss = loss + coef_off * losses["off_support_l1"]
    if coef_ratio:
        losses["l1_l2_ratio"] = l1_l2_ratio_ref(h, active, ratio_eps)
        loss = loss + coef_ratio * losses["l1_l2_ratio"]
    if coef_decnorm:
        losses["decoder_norm_l1"] = decoder_norm_l1_ref(values, indices, W_dec)
        loss = loss + coef_decnorm * losses["decoder_norm_l1"]
    if dead is not None and k_aux > 0:
        with torch.no_grad():
            _, aux_idx = auxk_select_ref(h, dead, k_aux)
        aux_values = h.gather(1, aux_idx) * dead[aux_idx]
        losses["auxk"] = auxk_loss_ref(x, recon, aux_values, aux_idx, W_dec, dead.any())
        loss = loss + coef_auxk * losses["auxk"]
    return loss, losses, recon, values, indices


# ----------------------------------------------------------------------------------------
# Matryoshka Top-k and the Gated SAE, by dense autograd: the oracles of their modules
# ----------------------------------------------------------------------------------------
def matryoshka_prefix_recons_ref(values, indices, W_dec, b_dec, sizes):
    """The reconstruction of each nested dictionary: for each prefix size ``m`` in ``sizes``,
    the code restricted to latents ``< m`` decoded by the first ``m`` decoder rows, one dense
    decode per prefix (``[B x D]`` per size)."""
    code = dense_code_ref(values, indices, W_dec.shape[0])
    return [code[:, :m] @ W_dec[:m] + b_dec for m in sizes]


def matryoshka_topk_loss_ref(x, W_enc, b_enc, W_dec, b_dec, k: int, sizes, recon_loss: str = "fvu"):
    """Loss of a Matryoshka Top-k SAE: each prefix ``m_1 < ... < m_n = F`` of the latents
    reconstructs ``x`` from the Top-k code; the terms are summed. Returns ``(loss, recons)``."""
    h = encode_ref(x, W_enc, b_enc, b_dec)
    with torch.no_grad():
        picked, indices = topk_select_ref(h, k)
    values = h.gather(1, indices) * (picked > 0)
    recons = matryoshka_prefix_recons_ref(values, indices, W_dec, b_dec, sizes)
    term = fvu_ref if recon_loss == "fvu" else mse_ref
    return sum(term(x, r) for r in recons), recons


def gated_sae_loss_ref(x, W_gate, b_gate, r_mag, b_mag, W_dec, b_dec, *, coef_sparsity: float = 0.0,
                       coef_aux: float = 1.0, recon_loss: str = "fvu"):
    """Loss of a Gated SAE (Rajamanoharan et al., 2024) from its defining formulas:
    ``pi = (x - b_dec) W_gate^T + b_gate``, ``W_mag = exp(r_mag) * W_gate`` (row-wise),
    ``f = 1[pi > 0] * relu((x - b_dec) W_mag^T + b_mag)``; the loss is the reconstruction of
    ``x`` from ``f``, plus ``coef_sparsity * (1/B) sum_ij relu(pi_ij) ||W_dec_j||``, plus
    ``coef_aux`` times the reconstruction from ``relu(pi)`` through the frozen (detached)
    decoder. Returns ``(loss, losses, f)``."""
    xc = x - b_dec
    pi = xc @ W_gate.T + b_gate
    mag = xc @ (W_gate * torch.exp(r_mag)[:, None]).T + b_mag
    f = (pi > 0).to(x.dtype) * torch.relu(mag)
    term = fvu_ref if recon_loss == "fvu" else mse_ref
    losses = {"recon": term(x, f @ W_dec + b_dec),
              "decoder_norm_l1": (torch.relu(pi) * W_dec.norm(dim=1)).sum(1).mean(),
              "gate_aux": term(x, torch.relu(pi) @ W_dec.detach() + b_dec.detach())}
    loss = losses["recon"] + coef_sparsity * losses["decoder_norm_l1"] + coef_aux * losses["gate_aux"]
    return loss, losses, f
