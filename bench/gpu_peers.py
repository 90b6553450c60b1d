"""The benchmark suite on a GPU: bench/suite.py with ``--device cuda`` (bf16 unless ``--dtype``),
at B = 4096, D in {1024, 4096}, F in {32768, 131072}, k in {32, 128}. Extra arguments pass through.

    python bench/gpu_peers.py                       # JSON to bench/results/suite_cuda.json
    python bench/report.py bench/results/suite_cpu.json bench/results/suite_cuda.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return suite.main(["--device", "cuda", *argv] if "--device" not in argv else argv)


if __name__ == "__main__":
    sys.exit(main())
