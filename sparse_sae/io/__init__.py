"""Getting activations and SAEs in and out: extraction from ``transformers`` models
(:mod:`~sparse_sae.io.extract`), SAELens and sparsify interop (:mod:`~sparse_sae.io.interop`),
the token sidecar of extracted data (:mod:`~sparse_sae.io.sidecar`)."""
from sparse_sae.io.interop import from_saelens, from_sparsify, read_saelens, read_sparsify, to_saelens, to_sparsify

__all__ = ["to_saelens", "to_sparsify", "from_saelens", "from_sparsify", "read_saelens", "read_sparsify"]
