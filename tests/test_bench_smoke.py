"""Smoke test of the benchmark suite (bench/suite.py) and the README table generator
(bench/report.py) at tiny sizes. Peers need not be installed: their rows are skipped with the
reason. Checks what the suite reports, never how fast anything ran."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402
import suite  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert suite.main(["--shapes", "37,12,53,5", "--steps", "2", "--warmup", "1", "--threads", "1",
                       "--impls", "ours", "dense", "sparsify", "--no-memory", "--out", str(out)]) == 0
    return json.loads((out / "suite_cpu.json").read_text())


def test_suite_rows(results):
    rows = {(r["variant"], r["impl"]): r for r in results["rows"]}
    assert len(rows) == 8 * 3
    for variant in ("topk", "topk_off", "topk_ratio", "batchtopk", "relu_l1", "jumprelu", "gated", "matryoshka"):
        for impl in ("ours", "dense"):
            r = rows[variant, impl]
            assert r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
            assert r["grad_rel_error"] < 1e-5, (variant, impl, r["grad_rel_error"])
        assert rows[variant, "ours"]["ratio_to_ours"] == 1.0
    assert rows["batchtopk", "sparsify"]["skipped"] == "sparsify has no batchtopk SAE"
    env = results["env"]
    assert env["torch_threads"] == 1 and env["dtype"] == "float32" and env["device"] == "cpu"
    assert "sparse-sae" in env["versions"] and "eai-sparsify" in env["versions"]
    assert "--shapes" in results["command"]


def test_memory_row_and_bad_shape():
    mb = suite.memory_row("ours", "topk_ratio", (17, 8, 29, 3), torch.device("cpu"), torch.float32)
    assert mb >= 0
    with pytest.raises(SystemExit):
        suite.build_parser().parse_args(["--shapes", "4,4,4,9"])   # k > F


def test_report_rewrites_only_between_markers(results, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\nbefore\n{report.START}\nold table\n{report.END}\nafter\n")
    src = tmp_path / "suite_cpu.json"
    src.write_text(json.dumps(results))
    assert report.main([str(src), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# t\n\nbefore\n") and text.endswith(f"{report.END}\nafter\n")
    assert "old table" not in text
    assert "| Top-k + l1/l2 ratio | **sparse_sae** |" in text
    assert "| BatchTopK | sparsify | skipped |" in text
    assert "### GPU\n\nNot measured" in text and "B = 37, D = 12, F = 53, k = 5" in text
    assert results["command"] in text
    readme.write_text("no markers\n")
    assert report.main([str(src), "--readme", str(readme)]) == 1


def test_cli_bench_runs_the_checkout_suite(tmp_path, capsys):
    from sparse_sae.cli import main
    assert main(["bench", "--shapes", "20,6,16,2", "--impls", "dense", "--variants", "topk", "--steps", "1",
                 "--warmup", "0", "--no-memory", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "suite_cpu.json").read_text())["rows"]
    assert [(r["impl"], r["variant"]) for r in rows] == [("ours", "topk"), ("dense", "topk")]


def test_gpu_check_scripts_parse():
    """The prepared GPU call (bench/gpu_check.sh) and its sanitizer script, which run only on a GPU
    machine: the shell script parses and the Python script answers --help."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    assert subprocess.run(["bash", "-n", str(bench / "gpu_check.sh")]).returncode == 0
    res = subprocess.run([sys.executable, str(bench / "sanitize_kernels.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "compute-sanitizer" in res.stdout, res.stderr


def test_cpu_step_soft_rows(tmp_path):
    """bench/cpu_step.py --soft: ReLU + l1 and JumpReLU + L0 (ours and dense) beside our Top-k step,
    at init and with b_enc lowered; what it reports, not how fast."""
    import cpu_step
    assert cpu_step.main(["--soft", "--shapes", "40,12,61,3", "--steps", "1", "--warmup", "0", "--no-memory",
                          "--soft-shift", "1.5", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cpu_step_soft.json").read_text())
    assert [r["state"] for r in data["rows"]] == ["init", "init, b_enc - 1.5"]
    assert data["rows"][0]["relu_l0"] > data["rows"][1]["relu_l0"]
    for r in data["rows"]:
        for v in ("ours_topk", "ours_relu", "dense_relu", "ours_jumprelu", "dense_jumprelu"):
            assert r[v]["median_ms"] > 0
    assert "| jumprelu |" in (tmp_path / "cpu_step_soft.md").read_text()


def test_roofline_floors_from_first_principles():
    """The floors are max(FLOPs / peak, bytes / bandwidth): checked here against the arithmetic
    written out for one compute-bound and one memory-bound stage."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from roofline import stage_floors, step_floors
    B, D, F, k = 4096, 4096, 131072, 32
    f = stage_floors(B, D, F, k, "bf16", tflops=1000.0, tbps=5.0)
    assert f["encode"] == pytest.approx(2 * B * D * F / 1e15 * 1e3)          # compute-bound
    assert f["adam"] == pytest.approx((2 * F * D + F + D) * 28 / 5e12 * 1e3)  # memory-bound
    plain, reg = step_floors(f)
    assert reg - plain == pytest.approx(f["penalty_gemm"]) and plain == pytest.approx(sum(f.values()) - f["penalty_gemm"])


def test_cpu_step_rows_include_bf16_autocast(tmp_path):
    """bench/cpu_step.py times the regularized step in float32 and under CPU bf16 autocast, side by
    side; checks the columns, never a time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import cpu_step
    assert cpu_step.main(["--shapes", "40,12,61,3", "--steps", "1", "--warmup", "0", "--no-memory",
                          "--b-enc-shift", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu_step.json").read_text())["rows"]
    assert rows and all(r["ours_regularized_bf16"]["median_ms"] > 0 for r in rows)
    assert "bf16 autocast" in (tmp_path / "cpu_step.md").read_text()


def test_latent_parallel_model():
    import latent_parallel as lp
    assert lp.comm_bytes_per_rank(4096, 4096, 32, 1) == 0
    assert lp.largest_f(4096, 4096, 8) > 7 * lp.largest_f(4096, 4096, 1)
    assert lp.per_rank_memory_gb(4096, 1 << 20, 4096, 8) < lp.per_rank_memory_gb(4096, 1 << 20, 4096, 2)
    assert "largest F" in lp.model_table()


def test_batch_cut_prints_a_row_per_dtype(capsys):
    import batch_cut
    batch_cut.main(["--shape", "37,53,5", "--repeats", "1", "--dtypes", "float32,bfloat16"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")]
    assert len(rows) == 2 and all(line.rstrip().endswith("x |") for line in rows), out
