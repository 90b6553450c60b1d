"""Sparsity penalties. Each holds its coefficient; the module computes the unweighted value
(``losses[name]``) and adds ``coef * value`` to the loss.

Which architecture takes which penalty:

=================  ===========================  ====================================
penalty            name in ``losses``           architectures
=================  ===========================  ====================================
OffSupportL1       ``off_support_l1``           TopKSAE, BatchTopKSAE (the paper's)
L1L2Ratio          ``l1_l2_ratio``              TopKSAE, BatchTopKSAE (the paper's)
DecoderNormL1      ``decoder_norm_l1``          every SAE
L0                 ``l0``                       JumpReLUSAE
=================  ===========================  ====================================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from sparse_sae._checks import check_int, check_optional_int, check_real
from sparse_sae.reference import RATIO_EPS


@dataclass(frozen=True)
class Penalty:
    coef: float

    name = "penalty"

    def __post_init__(self):
        object.__setattr__(self, "coef", check_real(self.coef, f"{type(self).__name__}.coef"))

    def to_config(self) -> dict:
        return {"type": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class OffSupportL1(Penalty):
    """``(1/B) sum_i sum_{j in A, j not in S_i} h_ij``: l1 of the pre-activations of batch-active
    units outside each row's Top-k support (arXiv:2606.27321)."""
    name = "off_support_l1"


@dataclass(frozen=True)
class L1L2Ratio(Penalty):
    """``(1/B) sum_i ||h_i[A]||_1 / (||h_i[A]||_2 + eps)``: the scale-invariant l1/l2 ratio of each
    row's pre-activations over the batch-active units (arXiv:2606.27321)."""
    eps: float = RATIO_EPS
    name = "l1_l2_ratio"

    def __post_init__(self):
        super().__post_init__()
        check_real(self.eps, "L1L2Ratio.eps", positive=True)


@dataclass(frozen=True)
class DecoderNormL1(Penalty):
    """``(1/B) sum_ij a_ij ||W_dec[j]||``: l1 of the code weighted by decoder row norms."""
    name = "decoder_norm_l1"


@dataclass(frozen=True)
class L0(Penalty):
    """``(1/B) sum_ij 1[z_ij > theta_j]`` with a straight-through threshold gradient
    (rectangle kernel of the JumpReLU SAE's bandwidth; GemmaScope convention)."""
    name = "l0"


@dataclass(frozen=True)
class AuxK:
    """AuxK (Gao et al. 2024): the ``k_aux`` largest pre-activations among dead latents
    reconstruct the residual; ``coef`` weighs that loss. A latent is dead after
    ``dead_after_tokens`` training rows without firing. ``k_aux=None`` uses ``d_in // 2``."""
    coef: float = 1 / 32
    k_aux: int | None = None
    dead_after_tokens: int = 10_000_000

    def __post_init__(self):
        object.__setattr__(self, "coef", check_real(self.coef, "AuxK.coef"))
        check_optional_int(self.k_aux, "AuxK.k_aux", 1)
        check_int(self.dead_after_tokens, "AuxK.dead_after_tokens", 1)

    def width(self, d_in: int, n_latents: int) -> int:
        """The number of dead latents each row's AuxK code takes: ``k_aux`` (default ``d_in // 2``),
        at most ``n_latents``."""
        return min(self.k_aux or max(d_in // 2, 1), n_latents)

    def to_config(self) -> dict:
        return {"type": "AuxK", **asdict(self)}


PENALTY_TYPES = {cls.__name__: cls for cls in (OffSupportL1, L1L2Ratio, DecoderNormL1, L0)}


def penalty_from_config(cfg: dict):
    cfg = dict(cfg)
    kind = cfg.pop("type")
    if kind == "AuxK":
        return AuxK(**cfg)
    if kind not in PENALTY_TYPES:
        raise ValueError(f"unknown penalty type {kind!r}; expected one of {sorted(PENALTY_TYPES)} or 'AuxK'")
    return PENALTY_TYPES[kind](**cfg)
