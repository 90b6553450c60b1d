"""bench/gpu_suite.py in its CPU dry run: tiny shapes, every pair checked for agreement, the
JSON written and the table printed (no timings claimed)."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_suite.py"


def test_gpu_kernel_bench_dry_run(tmp_path):
    # The Triton kernels run in Triton's interpreter, so the dry run checks them against torch
    # (on the CPU backend the comparison would be of torch with itself).
    env = {**os.environ, "TRITON_INTERPRET": "1", "SPARSE_SAE_BACKEND": "triton"}
    res = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert result["environment"]["dry_run"] is True
    assert {r["op"] for r in result["rows"]} == {"encode", "sparse_decode", "train_step", "select"}
    assert {r["backend"] for r in result["rows"] if r["op"] in ("encode", "sparse_decode")} == {"triton"}
    assert "dry run (not a measurement)" in res.stdout.splitlines()[-1]
