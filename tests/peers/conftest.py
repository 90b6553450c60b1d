"""The interop tests against the real SAELens and sparsify (pinned in bench/peers/requirements.txt).

They run in the peers' own environment: `make test` builds it (.venv-peers, as `make bench-peers`
does) and runs `pytest tests/peers` there; the core suite does not collect this folder (pyproject's
norecursedirs). Where the peers' environment could not be built, the Makefile passes the reason in
SPARSE_SAE_PEERS_UNAVAILABLE and the tests are skipped with it.
"""
import os

# sparsify's own switch for its eager decoder: its Triton decoder needs a GPU
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
