"""SAE modules: drop-in ``torch.nn`` modules built on the ``sparse_sae`` ops.

Every SAE has ``W_enc (F x D)``, ``b_enc (F)``, ``W_dec (F x D)`` and ``b_dec (D)``.
``sae(x)`` returns an :class:`SAEOutput` with the unweighted loss terms and their weighted
sum (:meth:`SparseAutoencoder.loss`, the one place where terms are weighted); ``sae.encode(x)``
the sparse code as ``(values, indices)``, with no side effect; ``sae.decode(values, indices)``
the reconstruction. A module knows nothing of backends: the ops choose them.

Each architecture is a subclass in its own file (``topk.py``, ``relu.py``) that names itself
with ``architecture = "..."`` (the trainer's ``--architecture``) and lists the penalties it
takes; subclasses register themselves in :data:`ARCHITECTURES`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sparse_sae import ops, reference
from sparse_sae._checks import check_activations, check_code, check_int, check_real
from sparse_sae.geometric_median import geometric_median
from sparse_sae.penalties import DecoderNormL1, Penalty
from sparse_sae.saes import serialization

RECON_LOSSES = ("fvu", "mse")
# Every architecture, by class name (the ``class`` of a saved ``config.json``); filled by
# ``SparseAutoencoder.__init_subclass__`` from each subclass that sets ``architecture``.
ARCHITECTURES: dict[str, type] = {}


def pack_dense_code(code, n_latents: int):
    """``(values, indices)`` of the positive entries of a dense ``B x F`` code (no gradient)."""
    with torch.no_grad():
        sel = ops.select(code.detach(), mode="threshold", threshold=code.new_zeros(n_latents))
    return sel.values, sel.indices


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

    def _pack_dense_code(self):
        self._values, self._indices = pack_dense_code(self._code, self._n_latents)

    @property
    def values(self):
        if self._values is None:
            self._pack_dense_code()
        return self._values

    @property
    def indices(self):
        if self._indices is None:
            self._pack_dense_code()
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


def add_sae_parameters(module: nn.Module, n_latents: int, d_in: int, dtype, device) -> None:
    """``W_enc (F x D)``, ``b_enc (F)``, ``W_dec (F x D)``, ``b_dec (D)`` (zeros) and the
    ``tokens_since_fired`` buffer: the training rows seen since each latent last fired, which feed
    AuxK and the dead fraction."""
    factory = {"dtype": dtype, "device": device}
    module.W_enc = nn.Parameter(torch.zeros(n_latents, d_in, **factory))
    module.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
    module.W_dec = nn.Parameter(torch.zeros(n_latents, d_in, **factory))
    module.b_dec = nn.Parameter(torch.zeros(d_in, **factory))
    module.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.int64, device=device))


INIT_BLOCK_ROWS = 4096    # decoder rows drawn from one generator at initialisation


def init_decoder_rows(seed: int, lo: int, hi: int, d_in: int, dtype=None, device=None) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the initial decoder: Gaussian rows scaled to unit norm. Each block of
    :data:`INIT_BLOCK_ROWS` rows comes from its own generator, seeded from ``seed`` and the block's
    index, so a latent-parallel shard builds its slice alone and gets the whole matrix's rows."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    rows = torch.empty(hi - lo, d_in, dtype=dtype, device=device)
    if device.type == "meta":
        return rows
    for block in range(lo // INIT_BLOCK_ROWS, (hi - 1) // INIT_BLOCK_ROWS + 1 if hi > lo else 0):
        start = block * INIT_BLOCK_ROWS
        g = torch.Generator(device=device).manual_seed((seed + block * 0x9E3779B97F4A7C15) % 2**63)
        drawn = torch.randn(INIT_BLOCK_ROWS, d_in, generator=g, dtype=dtype, device=device)
        a, b = max(lo, start), min(hi, start + INIT_BLOCK_ROWS)
        rows[a - lo:b - lo] = drawn[a - start:b - start]
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def draw_init_seed() -> int:
    """The seed of :func:`init_decoder_rows`, from torch's default (CPU) generator: ``torch.manual_seed``
    fixes the initialisation on every device."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


class TrainableSAE:
    """What a training loop calls on an SAE module, whole (:class:`SparseAutoencoder`) or sharded
    (:class:`~sparse_sae.saes.sharded.ShardedTopKSAE`): the loss weighting and the decoder
    constraint, the penalty checks. Needs ``allowed_penalties``, ``penalties``, ``auxk`` (None unless
    AuxK runs) and ``W_dec``."""

    def loss(self, out: SAEOutput, penalty_scale=1.0, recon_scale=1.0, auxk_scale=1.0) -> torch.Tensor:
        """The training loss of ``out``: ``recon_scale * (recon + sum_t w_t * recon_t)`` over the
        architecture's further reconstruction terms (:meth:`recon_terms`: Matryoshka's prefixes,
        the Gated SAE's auxiliary reconstruction), ``+ penalty_scale * sum_p coef_p * term_p``
        over the penalties, ``+ auxk_scale * coef * auxk`` when AuxK ran. ``forward`` sets
        ``out.loss`` with the defaults; the trainer calls it with its warm-up ``penalty_scale`` (and,
        with data parallelism, the ``recon_scale`` and ``auxk_scale`` that make the local FVU's and
        AuxK's gradients the global batch's)."""
        losses = out.losses
        loss = losses["recon"] * recon_scale
        for name, weight in self.recon_terms().items():
            loss = loss + (weight * recon_scale) * losses[name]
        for p in self.penalties:
            loss = loss + (penalty_scale * p.coef) * losses[p.name]
        if "auxk" in losses:
            loss = loss + (self.auxk.coef * auxk_scale) * losses["auxk"]
        return loss

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

    def penalty(self, cls):
        """The configured penalty of type ``cls``, or None."""
        return next((p for p in self.penalties if isinstance(p, cls)), None)

    def recon_terms(self) -> dict:
        """``{name: weight}`` of the reconstruction terms beyond ``recon`` (each measured like
        ``recon``, against the input's batch variance for FVU); none for most architectures."""
        return {}

    @torch.no_grad()
    def normalize_decoder_(self, eps: float = 1e-12) -> None:
        """Scales every decoder row to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(eps))

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scales the gradients so that their global norm is at most ``max_norm``; returns the norm."""
        return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)

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



class SparseAutoencoder(TrainableSAE, nn.Module):
    """Base of every SAE: parameters, input checks, the loss, decoder constraint, save and load."""

    allowed_penalties: tuple = (DecoderNormL1,)
    architecture: str | None = None    # the trainer's name for it; set by each concrete SAE

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "architecture" in cls.__dict__:
            ARCHITECTURES[cls.__name__] = cls

    def __init__(self, d_in: int, n_latents: int, penalties: Sequence[Penalty] = (), *, recon_loss: str = "fvu",
                 input_scale: float | None = None, check_inputs: bool = True, dtype=None, device=None):
        super().__init__()
        self.d_in = check_int(d_in, "d_in", 1)
        self.n_latents = check_int(n_latents, "n_latents", 1)
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        self.recon_loss = recon_loss
        self.input_scale = None if input_scale is None else check_real(input_scale, "input_scale", positive=True)
        self.check_inputs = check_inputs
        # whether forward checks x for NaN/Inf: a host synchronisation per call on a GPU; the
        # trainer turns it off, as its loader checks every row on the host first
        self.check_finite = True
        self.penalties = self._check_penalties(penalties)
        add_sae_parameters(self, n_latents, d_in, dtype, device)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Unit-norm random decoder rows (:func:`init_decoder_rows`), the encoder tied to the decoder
        at init, zero biases."""
        self.W_dec.copy_(init_decoder_rows(draw_init_seed(), 0, self.n_latents, self.d_in, self.W_dec.dtype,
                                           self.W_dec.device))
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.tokens_since_fired.zero_()

    # ------------------------------------------------------------------ forward helpers
    def _checked_scaled_input(self, x):
        """``x`` checked (shape, dtype, device, finite) and multiplied by the input scale."""
        if self.check_inputs and not torch.compiler.is_compiling():
            check_activations(x, self.d_in, self.W_enc, check_finite=self.check_finite)
        return x * self.input_scale if self.input_scale is not None else x

    def _unscale(self, recon):
        return recon / self.input_scale if self.input_scale is not None else recon

    def _recon_term(self, xs, recon):
        if self.recon_loss == "fvu" and xs.shape[0] < 2 and not torch.compiler.is_compiling():
            raise ValueError("recon_loss='fvu' needs a batch of at least 2 rows (the batch variance of "
                             "one row is 0); use recon_loss='mse' for single rows")
        return reference.fvu_ref(xs, recon) if self.recon_loss == "fvu" else reference.mse_ref(xs, recon)

    def _output(self, recon, losses, fired, **code) -> SAEOutput:
        """The :class:`SAEOutput` of a forward, its ``loss`` weighted by :meth:`loss`."""
        out = SAEOutput(self._unscale(recon), None, losses, fired, self.n_latents, **code)
        out.loss = self.loss(out)
        return out

    @torch.no_grad()
    def update_firing_stats(self, fired, rows: int) -> None:
        """In training mode, resets ``tokens_since_fired`` of the latents that fired in this batch
        of ``rows`` rows and adds ``rows`` to the others. The one place they change (the trainer
        overwrites them with the global batch's under data parallelism)."""
        if self.training:
            self.tokens_since_fired.copy_(torch.where(fired > 0, 0, self.tokens_since_fired + rows))

    def dead_mask(self, after_tokens: int) -> torch.Tensor:
        """Latents that have not fired in the last ``after_tokens`` training rows."""
        return self.tokens_since_fired >= after_tokens

    # ------------------------------------------------------------------ public API
    def forward(self, x) -> SAEOutput:  # pragma: no cover - each architecture defines it
        raise NotImplementedError

    def encode(self, x):
        """The sparse code of ``x``: ``(values, indices)``, each ``B x k`` (descending value).
        No side effect (no decode, no loss, no firing statistics or threshold update); works on
        a single row."""
        raise NotImplementedError

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
    def init_b_dec_(self, x, max_rows: int = 32768) -> None:
        """Sets ``b_dec`` to the geometric median of (up to ``max_rows`` rows of) ``x``."""
        xs = self._checked_scaled_input(x)[:max_rows]
        self.b_dec.copy_(geometric_median(xs.to(self.b_dec.dtype)))

    def config(self) -> dict:
        """Constructor arguments as JSON-ready values."""
        return {"d_in": self.d_in, "n_latents": self.n_latents,
                "penalties": [p.to_config() for p in self.penalties], "recon_loss": self.recon_loss,
                "input_scale": self.input_scale}

    def save(self, directory, fold_input_scale: bool = True, activations: dict | None = None) -> None:
        """Writes ``sae_weights.safetensors`` and ``config.json`` to ``directory``; see :func:`save`."""
        save(self, directory, fold_input_scale=fold_input_scale, activations=activations)

    @classmethod
    def load(cls, directory, device=None):
        """The SAE saved in ``directory`` (see :func:`load`), which must be a ``cls``."""
        sae = load(directory, device=device)
        if not isinstance(sae, cls):
            raise TypeError(f"{directory} holds a {type(sae).__name__}, not a {cls.__name__}")
        return sae

    def extra_repr(self) -> str:
        pens = ", ".join(f"{type(p).__name__}({p.coef:g})" for p in self.penalties)
        return f"d_in={self.d_in}, n_latents={self.n_latents}, penalties=[{pens}]"




def save(sae: SparseAutoencoder, directory, fold_input_scale: bool = True, activations: dict | None = None) -> None:
    """Writes ``sae`` to ``directory`` (created if needed), each file atomically. With
    ``fold_input_scale`` the input scale is folded into the weights and the saved SAE takes raw
    inputs. ``activations`` records where its inputs come from (``model``, ``layer``,
    ``hook_name``, ...; see :func:`sparse_sae.saes.serialization.saved_activations`)."""
    config = sae.config()
    if fold_input_scale and sae.input_scale is not None:
        state = serialization.folded_state(sae)
        config["input_scale"] = None
    else:
        state = sae.state_dict()
    serialization.write(directory, class_name=type(sae).__name__, dtype=sae.W_enc.dtype, config=config,
                        tensors=state, activations=activations)


def load(directory, device=None) -> SparseAutoencoder:
    """Loads an SAE saved by :func:`save`; ``device`` defaults to the CPU. The SAE comes back in
    eval mode (``encode`` then updates no firing statistics); call ``.train()`` to train it further."""
    meta, state, cfg_path = serialization.read(directory, device=device)
    cls = ARCHITECTURES.get(meta.get("class"))
    if cls is None:
        raise ValueError(f"{cfg_path} names unknown class {meta.get('class')!r}; expected one of "
                         f"{sorted(ARCHITECTURES)}")
    try:
        sae = cls(**meta["config"], dtype=getattr(torch, meta.get("dtype", "float32")), device=device)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{cfg_path} does not describe a valid {cls.__name__}: {type(exc).__name__}: {exc}") from exc
    try:
        sae.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{cfg_path.parent / serialization.WEIGHTS_FILE} is damaged or does not match {cfg_path}: "
                         f"{' '.join(str(exc).split())}") from exc
    return sae.eval()
