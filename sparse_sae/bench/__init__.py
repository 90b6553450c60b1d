"""``sparse-sae bench``: runs the benchmark suite of a source checkout (``bench/suite.py``)."""
