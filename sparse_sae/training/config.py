"""Training configuration: one flat dataclass (the flat JSON of every saved run and checkpoint), read from JSON/TOML files and command-line flags,
checked for unknown keys, and turned into an SAE.

Every field is documented in :class:`TrainConfig`; ``sparse-sae train --help`` lists the same.
"""
from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sparse_sae import saes
from sparse_sae.penalties import L0, AuxK, DecoderNormL1, L1L2Ratio, OffSupportL1

# The architectures with a hard budget k (and AuxK, and the paper's penalties).
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")

# Fields that may change between a checkpoint and its resumption; every other field must match.
RUN_FIELDS = frozenset({"steps", "out_dir", "checkpoint_every", "keep_checkpoints", "log_every", "progress",
                        "tensorboard", "data", "device", "skip_nonfinite", "latent_parallel"})


def option(default, help: str):
    """A field with its ``--help`` text in the field's metadata (read by ``sparse_sae.cli``)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults suit a first run on model activations."""

    # --- data
    data: str | None = option(None, ".npy file, directory of .npy files, or directory of safetensors shards")
    data_key: str | None = option(None, "tensor name inside the shards (default: the only one there)")
    memory_budget_mb: float = option(1024.0, "rows held in memory at once for shuffling")
    shuffle: bool = option(True, "shuffle rows (within the memory budget)")
    skip_nonfinite: bool = option(False, "drop data rows holding NaN/Inf (counted as skipped_rows in the metrics) instead of stopping")
    # --- model
    architecture: str = option("topk", "topk | batchtopk | matryoshka | relu | jumprelu | gated")
    n_latents: int | None = option(None, "SAE width; default expansion_factor * d_in")
    expansion_factor: int = option(16, "n_latents = expansion_factor * d_in when n_latents is unset")
    k: int = option(32, "active latents per row (topk, batchtopk)")
    matryoshka_sizes: str | None = option(None, "matryoshka: sizes of the nested prefixes of the latents, comma-separated (e.g. 1024,4096; n_latents is added)")
    max_k_per_row: int | None = option(None, "batchtopk: most entries a row keeps (a fixed code width: no host sync per step on a GPU)")
    off_support_l1: float = option(0.0, "paper penalty coefficient (topk, batchtopk); 0.02 did best on the demo")
    l1_l2_ratio: float = option(0.0, "paper penalty coefficient (topk, batchtopk); 0.01 did best on the demo")
    decoder_norm_l1: float = option(0.0, "l1 weighted by decoder norms (all; usual for relu)")
    l0: float = option(0.0, "L0 with straight-through gradient (jumprelu)")
    auxk: float = option(1 / 32, "AuxK coefficient (topk, batchtopk); 0 disables")
    dead_after_tokens: int = option(10_000_000, "a latent is dead after this many rows without firing")
    recon_loss: str = option("fvu", "fvu | mse")
    normalize_inputs: bool = option(True, "scale inputs to unit mean norm (folded into saved weights)")
    init_b_dec: bool = option(True, "b_dec := geometric median of the first rows")
    # --- optimisation
    steps: int = option(10_000, "optimizer steps")
    batch_size: int = option(4096, "global batch (split across processes)")
    lr: float = option(2e-4, "peak learning rate (Adam)")
    betas: tuple = option((0.9, 0.999), "Adam betas")
    warmup_steps: int = option(1000, "linear learning-rate warm-up")
    decay_start: float = option(0.8, "fraction of steps after which the rate decays linearly to 0")
    penalty_warmup_steps: int = option(0, "penalty coefficients ramp linearly from 0 over these steps")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables")
    seed: int = option(0, "seed of the initialisation and of the data order")
    # --- device
    latent_parallel: int = option(1, "latent shards: each group of this many processes (torchrun) splits one SAE's latents, each process holding n_latents / P of them (topk, batchtopk); the number of processes must be a multiple (data x latent)")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = option("float32", "parameter dtype")
    autocast: bool = option(True, "bf16 autocast on GPU (ignored on CPU)")
    flush_denormal: bool = option(True, "CPU: denormal floats count as 0 (Adam moments of rare latents decay into them; 2-6x faster)")
    # --- output
    out_dir: str = option("runs/sae", "run directory: checkpoints, metrics and the final SAE")
    checkpoint_every: int = option(1000, "steps; 0: only at the end")
    keep_checkpoints: int = 2
    log_every: int = option(10, "steps between metric records")
    tensorboard: bool = option(False, "also log to TensorBoard (needs the tensorboard package)")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if isinstance(self.matryoshka_sizes, str):
            try:
                self.matryoshka_sizes = tuple(int(m) for m in self.matryoshka_sizes.replace(" ", "").split(",") if m)
            except ValueError:
                raise ValueError(f"matryoshka_sizes must be comma-separated integers, got {self.matryoshka_sizes!r}") \
                    from None
        elif self.matryoshka_sizes is not None:
            self.matryoshka_sizes = tuple(self.matryoshka_sizes)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        saes.architecture_class(self.architecture)   # raises for an unknown name
        for name in ("steps", "batch_size", "k", "expansion_factor", "log_every", "keep_checkpoints",
                     "dead_after_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "penalty_warmup_steps", "checkpoint_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.n_latents is not None and (isinstance(self.n_latents, bool) or not isinstance(self.n_latents, int)
                                           or self.n_latents < 1):
            raise ValueError(f"n_latents must be a positive int or None, got {self.n_latents!r}")
        for name in ("off_support_l1", "l1_l2_ratio", "decoder_norm_l1", "l0", "auxk", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite positive number, got {self.lr!r}")
        if not 0 <= self.decay_start <= 1:
            raise ValueError(f"decay_start must be in [0, 1], got {self.decay_start!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.recon_loss not in ("fvu", "mse"):
            raise ValueError(f"recon_loss must be 'fvu' or 'mse', got {self.recon_loss!r}")
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, float64, bfloat16 or float16, got {self.dtype!r}")
        topk = self.architecture in TOPK_FAMILY
        if not topk and (self.off_support_l1 or self.l1_l2_ratio):
            raise ValueError(f"off_support_l1 and l1_l2_ratio apply to {', '.join(TOPK_FAMILY)}, not "
                             f"{self.architecture}")
        if (self.matryoshka_sizes is not None) != (self.architecture == "matryoshka"):
            raise ValueError("matryoshka_sizes is needed by, and applies only to, architecture 'matryoshka'")
        if self.l0 and self.architecture != "jumprelu":
            raise ValueError(f"l0 applies to jumprelu only, not {self.architecture}")
        if isinstance(self.latent_parallel, bool) or not isinstance(self.latent_parallel, int) \
                or self.latent_parallel < 1:
            raise ValueError(f"latent_parallel must be a positive int, got {self.latent_parallel!r}")
        if self.latent_parallel > 1 and self.architecture not in ("topk", "batchtopk"):
            raise ValueError(f"latent_parallel applies to topk and batchtopk, not {self.architecture}")
        if self.max_k_per_row is not None and self.architecture != "batchtopk":
            raise ValueError(f"max_k_per_row applies to batchtopk only, not {self.architecture}")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        """A config from ``values``; an unknown key is an error that names the closest known one."""
        known = cls.field_names()
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(f"{source} has unknown key(s) {', '.join(hints)}; known keys: {', '.join(known)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path, **overrides) -> "TrainConfig":
        """Reads a ``.json`` or ``.toml`` file; ``overrides`` (e.g. from flags) win."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib
                values = tomllib.loads(text)
            else:
                values = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - JSON and TOML raise different types
            raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from exc
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values")
        values.update(overrides)
        return cls.from_dict(values, source=f"config file {path}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        if self.matryoshka_sizes is not None:
            d["matryoshka_sizes"] = list(self.matryoshka_sizes)
        return d

    def mismatches(self, other: "TrainConfig") -> dict:
        """Fields (outside :data:`RUN_FIELDS`) whose values differ: ``{name: (self, other)}``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in RUN_FIELDS and a[k] != b[k]}

    # ------------------------------------------------------------------ model
    def latents_for(self, d_in: int) -> int:
        return self.n_latents or self.expansion_factor * d_in

    def build_sae(self, d_in: int, input_scale: float | None = None, device=None, latent_group=None):
        """The SAE this config describes, for inputs of width ``d_in``; with ``latent_parallel > 1``
        this process's :class:`~sparse_sae.saes.sharded.ShardedTopKSAE` slice of it over
        ``latent_group`` (built alone: the whole SAE is never held)."""
        import torch

        penalties = []
        if self.off_support_l1:
            penalties.append(OffSupportL1(self.off_support_l1))
        if self.l1_l2_ratio:
            penalties.append(L1L2Ratio(self.l1_l2_ratio))
        if self.decoder_norm_l1:
            penalties.append(DecoderNormL1(self.decoder_norm_l1))
        if self.l0:
            penalties.append(L0(self.l0))
        cls = saes.architecture_class(self.architecture)
        kwargs = dict(recon_loss=self.recon_loss, input_scale=input_scale, dtype=getattr(torch, self.dtype),
                      device=device)
        n = self.latents_for(d_in)
        if self.architecture in TOPK_FAMILY:
            if self.k > n:
                raise ValueError(f"k={self.k} exceeds the number of latents {n}")
            auxk = AuxK(self.auxk, dead_after_tokens=self.dead_after_tokens) if self.auxk else None
            if self.architecture == "batchtopk":
                kwargs["max_k_per_row"] = self.max_k_per_row
            if self.latent_parallel > 1:
                return saes.ShardedTopKSAE(d_in, n, self.k, penalties, mode=self.architecture, auxk=auxk,
                                           group=latent_group, **kwargs)
            if self.architecture == "matryoshka":
                return cls(d_in, n, self.k, self.matryoshka_sizes, penalties, auxk=auxk, **kwargs)
            return cls(d_in, n, self.k, penalties, auxk=auxk, **kwargs)
        return cls(d_in, n, penalties, **kwargs)


FIELD_DOCS = {f.name: f.metadata["help"] for f in fields(TrainConfig) if "help" in f.metadata}
FIELD_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
