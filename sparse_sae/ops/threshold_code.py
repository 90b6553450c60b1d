"""``sparse_sae::threshold_code``: encode -> threshold select -> code, one autograd node, for the
soft-penalty SAEs (ReLU: ``a = z [z > 0]``; JumpReLU: ``a = z [z > theta_j]``).

Forward: ``z = (x - b_dec) @ W_enc.T + b_enc`` and, by the density of active entries (sampled
on every 8th row; ``regime`` forces one):

- **sparse regime** (a trained SAE: tens of active latents out of thousands): the packed code
  ``values``/``indices`` (each row's active entries in descending value, ties to the lower
  index, padded with value 0 at the lowest inactive indices: ``ops.select``'s threshold
  packing, exact width) and, for JumpReLU, the inactive entries of the band
  ``|z - theta_j| < bandwidth / 2`` (``band_indices``, ``n_band`` per row) with
  ``band_values``, identically zero but differentiable: decoded with the code, their
  gradient is ``dL/da`` there, which the straight-through estimator turns into ``dtheta``;
- **dense regime** (initialisation: about half of the entries active): the ``B x F`` code
  ``dense``, decoded by a GEMM (a sorted packing and a gather decoder would cost more).

``l0 = (1/B) sum_ij [z_ij > theta_j]`` (``L0``'s value) and ``fired`` (per latent) in both.

Backward: ``dL/dz = dL/da [z > theta]`` lives on the active entries. Sparse regime: accumulated by
latent by the sparse decoder's kernels (CPU and Triton; ``x - b_dec`` plays the upstream
gradient), which read only the packed code, so ``z`` is not kept;
dense regime: masked one block of rows at a time into fixed-chunk GEMMs (CPU kernel). The
threshold's gradient comes from the band only (GemmaScope's rectangle kernel):
``dtheta_j = -(theta_j / bw) sum_band dL/da_ij - (1 / bw) (dL/dl0 / B) |band_j|``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sparse_sae import reference
from sparse_sae._checks import check_op_args
from sparse_sae.ops._registry import _C, dispatch, register_impl
from sparse_sae.ops.encode import encode
from sparse_sae.ops.sparse_decode import sparse_decode, sparse_decode_backward

REGIMES = ("auto", "dense", "sparse")
# Density of active entries below which the packed (sparse) code is built; the CPU kernel's
# constant (csrc/threshold_code.cpp: kSparseDensity) is the same.
SPARSE_DENSITY = 0.05


class ThresholdCode(NamedTuple):
    values: Tensor        # B x w, differentiable (sparse regime; B x 0 in the dense regime)
    indices: Tensor       # B x w, int64
    band_values: Tensor   # B x wb zeros, differentiable: the inactive band entries (JumpReLU)
    band_indices: Tensor  # B x wb, int64; entries past n_band[i] are padding (index 0)
    n_band: Tensor        # B, int64
    dense: Tensor         # B x F, differentiable (dense regime; B x 0 in the sparse regime)
    l0: Tensor            # 0-d, mean active entries per row (gradient reaches theta)
    fired: Tensor         # F, int64: rows where each latent is active
    z: Tensor             # B x F pre-activations (no gradient flows through it)

    @property
    def is_dense(self) -> bool:
        return self.dense.shape[1] > 0


@torch.library.custom_op("sparse_sae::threshold_code", mutates_args=())
def _threshold_code(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, theta: Optional[Tensor],
                    bandwidth: float, regime: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                            Tensor, Tensor]:
    return tuple(dispatch("threshold_code", x.device)(x, W_enc, b_enc, b_dec, theta, bandwidth, regime))


@_threshold_code.register_fake
def _(x, W_enc, b_enc, b_dec, theta, bandwidth, regime):
    B, F = x.shape[0], W_enc.shape[0]
    ctx = torch.library.get_ctx()
    w, wb, wd = ctx.new_dynamic_size(), ctx.new_dynamic_size(), ctx.new_dynamic_size()
    i64 = torch.int64
    return (x.new_empty(B, w), x.new_empty(B, w, dtype=i64), x.new_empty(B, wb), x.new_empty(B, wb, dtype=i64),
            x.new_empty(B, dtype=i64), x.new_empty(B, wd), x.new_empty((), dtype=reference.acc_dtype(x.dtype)),
            x.new_empty(F, dtype=i64), x.new_empty(B, F))


def _setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, theta, bandwidth, regime = inputs
    values, indices, band_values, band_indices, n_band, dense, l0, fired, z = output
    ctx.bandwidth = bandwidth
    ctx.dense = dense.shape[1] > 0
    # ReLU's dense code is positive exactly where z is: it stands in for z in the backward's mask;
    # the sparse regime's backward reads only the packed code. Then z (B x F) is freed after the
    # forward; JumpReLU's dense regime keeps it for the band.
    saved_z = z if (ctx.dense and theta is not None) else (dense if ctx.dense else None)
    ctx.save_for_backward(x, W_enc, b_dec, theta, saved_z, values, indices, band_indices, n_band)
    ctx.mark_non_differentiable(indices, band_indices, n_band, fired, z)
    # Unused outputs arrive as None (no decoder-norm penalty, no L0): they cost nothing.
    ctx.set_materialize_grads(False)


def _backward(ctx, g_values, g_indices, g_band_values, g_band_indices, g_n_band, g_dense, g_l0, g_fired, g_z):
    x, W_enc, b_dec, theta, z, values, indices, band_indices, n_band = ctx.saved_tensors
    B = x.shape[0]
    bw = ctx.bandwidth
    need_dx = ctx.needs_input_grad[0]
    need_theta = theta is not None and ctx.needs_input_grad[4]
    if ctx.dense:
        g = g_dense if g_dense is not None else torch.zeros_like(z)
        dW_enc, db_enc, db_dec, dx, band_g, band_n = dispatch("threshold_dense_backward", z.device)(
            x, W_enc, b_dec, z, theta, bw, g, need_dx)
    else:
        sp = torch.zeros_like(values) if g_values is None else g_values * (values > 0)   # padding: nothing
        dW_enc, db_enc, db_dec, dx = _sparse_encoder_grads(x, W_enc, b_dec, indices, sp.to(x.dtype), need_dx)
        band_g = band_n = None
        if need_theta:
            band_g, band_n = _band_sums_packed(values, indices, band_indices, n_band, theta, bw, sp, g_band_values)
    d_theta = None
    if need_theta:
        d_theta = -(theta / bw) * band_g
        if g_l0 is not None:
            d_theta = d_theta - (g_l0.to(theta.dtype) / (B * bw)) * band_n
    return (dx if need_dx else None), dW_enc, db_enc, db_dec, d_theta, None, None


def _sparse_encoder_grads(x, W_enc, b_dec, indices, dz, need_dx):
    """Encoder gradients from ``dL/dz`` on the packed entries, by the sparse decoder's kernels (CPU
    and Triton): ``dW_enc[j] = sum_i dz_ij (x_i - b_dec)`` is the decoder backward's ``dW`` with
    ``x - b_dec`` as the upstream gradient (grouped by latent, entries in row order); ``dx`` the
    sparse decode of ``dz`` through ``W_enc``; ``db_dec = -db_enc @ W_enc`` the decode of one row
    holding ``db_enc`` (summed over latents in order: the same bits for any thread count)."""
    F, D = W_enc.shape
    _, dW_enc = sparse_decode_backward(x - b_dec, dz, indices, W_enc)
    db_enc = dz.new_zeros(F).index_add_(0, indices.reshape(-1), dz.reshape(-1))
    every = torch.arange(F, device=indices.device)[None]
    db_dec = -sparse_decode(db_enc[None], every, W_enc, b_dec.new_zeros(D))[0]
    dx = sparse_decode(dz, indices, W_enc, x.new_zeros(D)) if need_dx else x.new_empty(0)
    return dW_enc, db_enc, db_dec, dx


def _band_sums_packed(values, indices, band_indices, n_band, theta, bw, g_active, g_band):
    """Per latent, the sum of ``dL/da`` over its band entries and their count: the active band
    entries of the packed code plus the listed inactive ones. ``index_add_`` in entry order."""
    F = theta.shape[0]
    on = values > 0
    in_band = on & (reference.rectangle((values - theta[indices]) / bw) > 0)
    listed = torch.arange(band_indices.shape[1], device=n_band.device) < n_band[:, None]
    band_g = theta.new_zeros(F).index_add_(0, indices[in_band], g_active[in_band].to(theta.dtype))
    if g_band is not None:
        band_g.index_add_(0, band_indices[listed], g_band[listed].to(theta.dtype))
    band_n = theta.new_zeros(F).index_add_(0, indices[in_band], theta.new_ones(()).expand(int(in_band.sum())))
    band_n.index_add_(0, band_indices[listed], theta.new_ones(()).expand(int(listed.sum())))
    return band_g, band_n


_threshold_code.register_autograd(_backward, setup_context=_setup_context)


def threshold_code(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, theta: Optional[Tensor] = None,
                   bandwidth: float = 1e-3, regime: str = "auto") -> ThresholdCode:
    """The threshold code of ``x``; see the module docstring.

    Shapes: ``x`` ``B x D``, ``W_enc`` ``F x D``, ``b_enc`` ``F``, ``b_dec`` ``D``, ``theta`` ``F``
    (positive JumpReLU thresholds; None: ReLU, threshold 0 and no band). ``bandwidth`` is the
    straight-through rectangle's width; ``regime`` is ``"auto"``, ``"dense"`` or ``"sparse"``.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not bandwidth > 0 \
            or bandwidth == float("inf"):
        raise ValueError(f"bandwidth must be a finite positive number, got {bandwidth!r}")
    F, D = W_enc.shape if W_enc.dim() == 2 else (None, None)
    shapes = {"x": (None, D), "W_enc": (F, D), "b_enc": (F,), "b_dec": (D,)}
    tensors = {"x": x, "W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec}
    if theta is not None:
        shapes["theta"], tensors["theta"] = (F,), theta
    check_op_args("threshold_code", shapes, tensors)
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        raise TypeError(f"threshold_code: x, W_enc, b_enc, b_dec and theta must share a dtype, got "
                        f"{sorted(str(d) for d in dtypes)}")
    return ThresholdCode(*_threshold_code(x, W_enc, b_enc, b_dec, theta, float(bandwidth), regime))


# ------------------------------------------------------------------------------ implementations
def _is_dense(z, theta, regime) -> bool:
    """The regime: forced, or from the density of active entries on every 8th row (a host
    synchronisation on the GPU, where the exact packed width needs one anyway)."""
    if regime != "auto":
        return regime == "dense"
    s = z[::8]
    thr = theta if theta is not None else 0
    return bool((s > thr).sum() >= SPARSE_DENSITY * s.numel()) if s.numel() else True


def _band_mask(z, theta, bw, on):
    if theta is None:
        return torch.zeros_like(on)
    return ~on & (reference.rectangle((z - theta) / bw) > 0)


def _pack_band(band):
    """Each row's band columns in ascending index order, padded with index 0; and the counts."""
    n_band = band.sum(1)
    wb = int(n_band.max()) if band.shape[0] else 0
    order = torch.sort((~band).to(torch.int8), dim=1, stable=True).indices[:, :wb]
    listed = torch.arange(wb, device=band.device) < n_band[:, None]
    return torch.where(listed, order, 0), n_band


def _code_from_z(z, theta, bw, regime, pack):
    """The forward's outputs from ``z``; ``pack(z, theta_or_zeros, on)`` packs the active entries."""
    B, F = z.shape
    thr = theta if theta is not None else z.new_zeros(F)
    on = z > thr
    i64 = torch.int64
    if _is_dense(z, theta, regime):
        fired = on.sum(0)
        dense = torch.where(on, z, torch.zeros((), dtype=z.dtype, device=z.device))
        return (z.new_empty(B, 0), z.new_empty(B, 0, dtype=i64), z.new_empty(B, 0), z.new_empty(B, 0, dtype=i64),
                z.new_zeros(B, dtype=i64), dense, _l0(fired, B, z), fired, z)
    values, indices = pack(z, thr, on)
    band_indices, n_band = _pack_band(_band_mask(z, theta, bw, on))
    fired = reference.fired_counts_ref(values, indices, F)
    return (values, indices, z.new_zeros(band_indices.shape), band_indices, n_band, z.new_empty(B, 0),
            _l0(fired, B, z), fired, z)


def _l0(fired, B, z):
    return (fired.sum().to(reference.acc_dtype(z.dtype)) / B)


def _threshold_code_reference(x, W_enc, b_enc, b_dec, theta, bandwidth, regime):
    z = reference.encode_ref(x, W_enc, b_enc, b_dec, relu=False)
    return _code_from_z(z, theta, bandwidth, regime, lambda z, thr, on: reference.pack_selected_ref(z, on, 0))


def _threshold_code_cpu(x, W_enc, b_enc, b_dec, theta, bandwidth, regime):
    if x.dtype not in (torch.float32, torch.float64):
        return _threshold_code_reference(x, W_enc, b_enc, b_dec, theta, bandwidth, regime)   # half types
    z = torch.addmm(b_enc, x - b_dec, W_enc.t())
    values, indices, band_indices, n_band, dense, fired = _C.threshold_code_cpu(
        z, theta.contiguous() if theta is not None else None, bandwidth, 0, REGIMES.index(regime))
    if band_indices.data_ptr() == indices.data_ptr():   # an extension built before the fix of aliased empties
        band_indices = band_indices.clone()
    band_values = z.new_zeros(band_indices.shape)
    return values, indices, band_values, band_indices, n_band, dense, _l0(fired, x.shape[0], z), fired, z


def _threshold_code_gpu(x, W_enc, b_enc, b_dec, theta, bandwidth, regime):
    """CUDA tensors (and CPU tensors under Triton's interpreter): the encoder GEMM is the Triton
    ``encode`` kernel, the packing the ``select`` op's threshold mode (the CUDA radix select)."""
    from sparse_sae.ops.select import _select
    z = encode(x, W_enc, b_enc, b_dec, False)

    def pack(z, thr, on):
        out = _select(z, 0, "threshold", 0, thr, None, 0)
        return out[0], out[1]
    return _code_from_z(z, theta, bandwidth, regime, pack)


def _dense_backward_torch(x, W_enc, b_dec, z, theta, bandwidth, g, need_dx):
    thr = theta if theta is not None else z.new_zeros(z.shape[1])
    G = g * (z > thr)
    dW_enc, db_enc, db_dec, dx = reference.encoder_grads_ref(G, x, W_enc, b_dec, need_dx)
    if theta is None:
        band_g = band_n = None
    else:
        K = reference.rectangle((z - thr) / bandwidth)
        band_g, band_n = (K * g).sum(0), K.sum(0)
    return dW_enc, db_enc, db_dec, (dx if need_dx else x.new_empty(0)), band_g, band_n


def _dense_backward_cpu(x, W_enc, b_dec, z, theta, bandwidth, g, need_dx):
    if z.dtype not in (torch.float32, torch.float64):
        return _dense_backward_torch(x, W_enc, b_dec, z, theta, bandwidth, g, need_dx)
    c = [t.contiguous() for t in (x, W_enc, b_dec, z)]
    return tuple(_C.threshold_dense_backward_cpu(*c, theta.contiguous() if theta is not None else None, bandwidth,
                                                 g.contiguous(), need_dx))


register_impl("threshold_code", "reference", _threshold_code_reference)
register_impl("threshold_dense_backward", "reference", _dense_backward_torch)
if _C is not None:
    register_impl("threshold_code", "cpu", _threshold_code_cpu)
    register_impl("threshold_dense_backward", "cpu", _dense_backward_cpu)
# On CUDA tensors: _threshold_code_gpu is registered by ops/_triton.py (under a device
# guard); the dense backward's GEMMs are cuBLAS through ATen (the GEMMs a dense step runs anyway),
# its masking one elementwise pass.
register_impl("threshold_dense_backward", "cuda", _dense_backward_torch)
