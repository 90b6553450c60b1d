"""The SAE modules: the base class (parameters, checks, the loss, save/load) in ``base.py``, one
file per family of architectures (``topk.py``, ``matryoshka.py``, ``relu.py``, ``gated.py``),
latent parallelism in ``sharded.py``, the file format in ``serialization.py``."""
from sparse_sae.saes.base import ARCHITECTURES, RECON_LOSSES, SAEOutput, SparseAutoencoder, load, save
from sparse_sae.saes.gated import GatedSAE
from sparse_sae.saes.matryoshka import MatryoshkaTopKSAE
from sparse_sae.saes.relu import JumpReLUSAE, ReLUSAE
from sparse_sae.saes.serialization import CONFIG_FILE, WEIGHTS_FILE, folded_state, saved_activations
from sparse_sae.saes.sharded import ShardedTopKSAE
from sparse_sae.saes.topk import BatchTopKSAE, TopKSAE


def architecture_class(name: str) -> type:
    """The SAE class whose ``architecture`` is ``name`` (``"topk"``, ``"batchtopk"``, ...)."""
    by_name = architecture_names()
    if name not in by_name:
        raise ValueError(f"architecture must be one of {sorted(by_name)}, got {name!r}")
    return by_name[name]


def architecture_names() -> dict:
    """``{architecture: class}`` of every registered SAE."""
    return {cls.architecture: cls for cls in ARCHITECTURES.values()}


__all__ = ["SparseAutoencoder", "SAEOutput", "TopKSAE", "BatchTopKSAE", "MatryoshkaTopKSAE", "ReLUSAE",
           "JumpReLUSAE", "GatedSAE", "ShardedTopKSAE", "ARCHITECTURES", "RECON_LOSSES", "save", "load", "folded_state",
           "saved_activations", "CONFIG_FILE", "WEIGHTS_FILE", "architecture_class", "architecture_names"]
