"""A run's data is never lost or silently wrong (issue 22): one process per run directory, resume
writes only into its run, damaged checkpoints detected and skipped, torn metrics repaired, file
modes from the umask, non-finite data named, one-line CLI errors, and what ``load`` accepts."""
import hashlib
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sparse_sae as S
from sparse_sae.cli import main
from sparse_sae.training.checkpoint import MANIFEST_FILE, latest_checkpoint, read_checkpoint
from sparse_sae.training.config import TrainConfig
from sparse_sae.training.data import ActivationLoader, NonFiniteDataError, check_finite_rows, open_source
from sparse_sae.training.metrics_log import MetricsLog, read_metrics
from sparse_sae.training.run_lock import RunLockedError
from sparse_sae.training.trainer import Trainer

D = 16


def _cfg(out_dir, **kw):
    base = dict(steps=10, batch_size=64, n_latents=48, k=4, warmup_steps=2, checkpoint_every=4, log_every=1,
                out_dir=str(out_dir), progress=False, off_support_l1=0.1, auxk=0.05, dead_after_tokens=128,
                memory_budget_mb=0.02)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def data(gen):
    return torch.randn(800, D, generator=gen)


@pytest.fixture
def npy(tmp_path, data):
    path = tmp_path / "acts.npy"
    np.save(path, data.numpy())
    return path


class _Interrupt(Exception):
    pass


def _crash_at(step):
    def on_step(trainer):
        if trainer.step == step:
            raise _Interrupt
    return on_step


def _cli(*args, env=None, **kw):
    """``python -m sparse_sae ARGS`` in a fresh process (one thread: these runs are small)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparse_sae", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sparse-sae {command}: error: "), stderr[-2000:]
    return lines[0]


def _assert_same_weights(a, b):
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name


def _fsize_limit(size: int = 20_000):
    """In a child process: files may not grow past ``size`` bytes (a full disk, reproducibly)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


# ---------------------------------------------------------------------------------------- 1. one run per directory
def test_a_held_run_directory_is_refused_naming_the_holder(tmp_path, data, npy):
    first = Trainer(_cfg(tmp_path / "run"), data)            # holds the directory until fit() ends
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        Trainer(_cfg(tmp_path / "run", seed=1), data)
    proc = _cli("train", "--data", npy, "--out-dir", tmp_path / "run", "--n-latents", 48, "--k", 4,
                "--batch-size", 64, "--steps", 10, "--no-progress")
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr, "train")
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in line
    first.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 11))
    with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints, a final SAE, metrics\)"):
        Trainer(_cfg(tmp_path / "run", seed=1), data)      # the lock is free again, the run is still there


def test_two_concurrent_runs_one_refused_nothing_lost(tmp_path, npy):
    """Two `sparse-sae train` on one --out-dir at once: one trains, the other exits 1 with one line;
    the run directory holds exactly the winner's run. (400 steps: long enough that the two overlap;
    without the lock both trained into one directory.)"""
    run = tmp_path / "run"
    flags = ["--data", npy, "--out-dir", run, "--n-latents", 48, "--k", 4, "--batch-size", 64, "--steps", 400,
             "--checkpoint-every", 50, "--log-every", 50, "--warmup-steps", 2, "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "sparse_sae", "train", *map(str, flags), "--seed", str(seed)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    results = [(p.communicate(timeout=300)[1], p.returncode)[::-1] for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    line = _one_error_line(loser, "train")
    assert "in use by another run" in line or "already holds a run" in line
    winner_seed = next(seed for seed, (rc, _) in zip((0, 1), results) if rc == 0)
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(50, 401, 50))
    ref = tmp_path / "ref"
    Trainer(TrainConfig(data=str(npy), out_dir=str(ref), n_latents=48, k=4, batch_size=64, steps=400,
                        checkpoint_every=50, log_every=50, warmup_steps=2, progress=False, device="cpu",
                        seed=winner_seed)).fit()
    got, want = S.load(run / "final"), S.load(ref / "final")
    for name, t in want.state_dict().items():       # same seed: equal up to the thread count's rounding
        torch.testing.assert_close(got.state_dict()[name], t, rtol=1e-4, atol=1e-5, msg=name)
    ckpt = read_checkpoint(run)
    assert ckpt.train_config["seed"] == winner_seed and ckpt.state["step"] == 400


def test_kill_9_releases_the_run_and_the_resume_is_bit_exact(tmp_path, npy):
    """SIGKILL while training (after a checkpoint, wherever the process then is): the OS frees the lock,
    the stale run.lock does not block the resume, and the resumed run ends with the weights of an
    uninterrupted one."""
    flags = ["--data", npy, "--n-latents", 48, "--k", 4, "--batch-size", 64, "--steps", 300,
             "--checkpoint-every", 7, "--log-every", 10, "--warmup-steps", 2, "--no-progress", "--device", "cpu"]
    assert _cli("train", *flags, "--out-dir", tmp_path / "full").returncode == 0
    run = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparse_sae", "train", *map(str, flags), "--out-dir", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (run / "checkpoints" / "latest").is_file():
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert (run / "run.lock").is_file()
    resumed = _cli("train", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_weights(S.load(tmp_path / "full" / "final"), S.load(run / "final"))
    assert read_metrics(run / "metrics.jsonl") and [r["step"] for r in read_metrics(run / "metrics.jsonl")] == \
        [r["step"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]


# ---------------------------------------------------------------------------------------- 2. resume writes into its run
def test_resume_with_a_config_without_out_dir_writes_into_the_resumed_run(tmp_path, npy, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                       # the default out_dir, runs/sae, would land here
    settings = {"data": str(npy), "n_latents": 48, "k": 4, "batch_size": 32, "steps": 6, "checkpoint_every": 2,
                "warmup_steps": 1, "progress": False}
    other = tmp_path / "runs" / "sae"                 # another run in the default place: must stay untouched
    assert main(["train", "--data", str(npy), "--n-latents", "48", "--k", "4", "--batch-size", "32", "--steps",
                 "2", "--out-dir", str(other), "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    run = tmp_path / "a"
    (tmp_path / "cut.json").write_text(json.dumps({**settings, "steps": 4, "out_dir": str(run)}))
    assert main(["train", "--config", str(tmp_path / "cut.json")]) == 0
    (tmp_path / "resume.json").write_text(json.dumps(settings))          # no out_dir
    assert main(["train", "--resume", str(run), "--config", str(tmp_path / "resume.json")]) == 0
    capsys.readouterr()
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    assert read_checkpoint(run).state["step"] == 6
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")][-1] == 6
    # the same order of flags with an explicit --out-dir elsewhere is refused, as is the Python API
    assert main(["train", "--resume", str(run), "--config", str(tmp_path / "resume.json"), "--steps", "8",
                 "--out-dir", str(tmp_path / "elsewhere")]) == 1
    assert "writes only into its own run directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="writes only into its own run directory"):
        Trainer(TrainConfig.from_dict({**settings, "steps": 8}), resume=run)
    assert not (tmp_path / "elsewhere").exists()
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------------------- 3. damaged checkpoints
@pytest.fixture
def cut_run(tmp_path, data):
    """An uninterrupted run and one stopped at step 9 (checkpoints at steps 4 and 8)."""
    Trainer(_cfg(tmp_path / "full"), data).fit()
    with pytest.raises(_Interrupt):
        Trainer(_cfg(tmp_path / "cut"), data, on_step=_crash_at(9)).fit()
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000008"
    return tmp_path / "full", tmp_path / "cut"


def test_manifest_records_each_file_size_and_sha256(cut_run):
    ckpt = latest_checkpoint(cut_run[1])
    manifest = json.loads((ckpt / MANIFEST_FILE).read_text())
    files = sorted(p.name for p in ckpt.iterdir() if p.name != MANIFEST_FILE)
    assert sorted(manifest["files"]) == files and manifest["step"] == 8
    for name in files:
        body = (ckpt / name).read_bytes()
        assert manifest["files"][name] == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _empty(path):
    path.write_bytes(b"")


def _flip_last_byte(path):                   # the last weight's last byte: the file still loads
    body = bytearray(path.read_bytes())
    body[-1] ^= 0x01
    path.write_bytes(bytes(body))


@pytest.mark.parametrize("name, damage, fault", [
    ("sae_weights.safetensors", _truncate, "bytes, the manifest says"),
    ("trainer_state.pt", _empty, "has 0 bytes"),
    ("sae_weights.safetensors", _flip_last_byte, "does not match its sha256"),
])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(cut_run, data, name, damage, fault):
    full, cut = cut_run
    damage(latest_checkpoint(cut) / name)
    with pytest.warns(UserWarning, match=f"step_00000008/{name}.*{fault}.*Resuming from .*step_00000004"):
        trainer = Trainer(_cfg(cut), data, resume=cut)
    assert trainer.step == 4 and trainer.last_checkpoint.name == "step_00000004"
    trainer.fit()
    _assert_same_weights(S.load(full / "final"), S.load(cut / "final"))
    drop = lambda r: {k: v for k, v in r.items() if k != "rows_per_s"}     # noqa: E731
    assert [drop(r) for r in read_metrics(cut / "metrics.jsonl")] == [drop(r) for r in
                                                                     read_metrics(full / "metrics.jsonl")]


def test_processes_checking_a_checkpoint_together_find_the_damage_once(cut_run):
    """verify_checkpoint(share=(i, n)): the n shares hash every file once between them, so exactly
    one of them reports a flipped byte; a truncated file is seen by all (sizes are always checked)."""
    from sparse_sae.training.checkpoint import verify_checkpoint
    _, cut = cut_run
    ckpt = latest_checkpoint(cut)
    assert all(verify_checkpoint(ckpt, share=(i, 3)) is None for i in range(3))
    _flip_last_byte(ckpt / "sae_weights.safetensors")
    found = [verify_checkpoint(ckpt, share=(i, 3)) for i in range(3)]
    assert sum(p is not None and "does not match its sha256" in p for p in found) == 1, found
    _flip_last_byte(ckpt / "sae_weights.safetensors")       # undone
    _truncate(ckpt / "trainer_state.pt")
    assert all("bytes, the manifest says" in verify_checkpoint(ckpt, share=(i, 3)) for i in range(3))


def test_the_cli_warns_in_one_line_and_reports_every_damage(cut_run, data, capsys):
    _, cut = cut_run
    np.save(cut.parent / "acts.npy", data.numpy())
    _flip_last_byte(cut / "checkpoints" / "step_00000008" / "sae_weights.safetensors")
    assert main(["train", "--resume", str(cut), "--data", str(cut.parent / "acts.npy")]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warned) == 1 and warned[0].startswith("sparse-sae train: warning: damaged checkpoint(s) skipped: ")
    assert "step_00000008/sae_weights.safetensors does not match its sha256" in warned[0]
    for ckpt in sorted((cut / "checkpoints").glob("step_*")):        # now steps 8 and 10
        _flip_last_byte(ckpt / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"no intact checkpoint.*step_00000010.*sha256.*step_00000008.*sha256"):
        Trainer(_cfg(cut), data, resume=cut)
    with pytest.raises(ValueError, match=r"step_00000008/sae_weights.safetensors does not match its sha256"):
        read_checkpoint(cut / "checkpoints" / "step_00000008")       # a checkpoint named directly: no fallback
    assert main(["train", "--resume", str(cut), "--data", str(cut.parent / "acts.npy")]) == 1
    assert "no intact checkpoint" in _one_error_line(capsys.readouterr().err, "train")


# ---------------------------------------------------------------------------------------- 4. metrics.jsonl
def test_torn_metrics_line_is_repaired_on_resume(cut_run, data):
    full, cut = cut_run
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 0.5, "fv')            # a crash in mid-append
    with pytest.warns(UserWarning, match="torn last line"):
        Trainer(_cfg(cut), data, resume=cut).fit()
    resumed = read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in read_metrics(full / "metrics.jsonl")]


def test_torn_line_is_skipped_by_the_reader_and_a_damaged_middle_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match=f"{path} line 2 is not a JSON record"):
        MetricsLog(path, truncate_after=3)


def test_a_failure_while_resume_truncates_metrics_loses_nothing(tmp_path):
    """The disk fills up (a file-size limit) while the truncated metrics are written: the old records
    must all still be there, and a later try truncates them."""
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s, "note": "x" * 100} for s in range(1, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = f"from sparse_sae.training.metrics_log import MetricsLog; MetricsLog({str(path)!r}, truncate_after=4)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: _fsize_limit(200))
    assert proc.returncode != 0 and "File too large" in proc.stderr
    assert read_metrics(path) == records
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    MetricsLog(path, truncate_after=4).close()
    assert read_metrics(path) == records[:4]


# ---------------------------------------------------------------------------------------- 5. file modes
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_are_created_with_the_umask(tmp_path, data, umask):
    from sparse_sae.io import interop
    from sparse_sae.io.extract import ShardWriter

    old = os.umask(umask)
    try:
        Trainer(_cfg(tmp_path / "run", steps=4, checkpoint_every=2), data).fit()
        sae = S.load(tmp_path / "run" / "final")
        interop.to_saelens(sae, tmp_path / "lens")
        interop.to_sparsify(sae, tmp_path / "sparsify")
        writer = ShardWriter(tmp_path / "acts", shard_rows=300)
        writer.add(data)
        writer.close()
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sum(p.suffix == ".safetensors" for p in files) >= 8
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# ---------------------------------------------------------------------------------------- 6. non-finite data
@pytest.fixture
def two_files(tmp_path, data):
    """acts/part_0.npy (rows 0-399) and acts/part_1.npy (rows 400-799), rows 300-301 of the second NaN."""
    d = tmp_path / "acts"
    d.mkdir()
    second = data[400:].clone()
    second[300:302, 3] = float("nan")
    np.save(d / "part_0.npy", data[:400].numpy())
    np.save(d / "part_1.npy", second.numpy())
    return d


def test_a_nan_row_mid_data_names_the_file_rows_and_step(tmp_path, two_files, capsys):
    flags = ["train", "--data", str(two_files), "--n-latents", "48", "--k", "4", "--batch-size", "100", "--steps",
             "8", "--no-shuffle", "--memory-budget-mb", "0.01", "--warmup-steps", "1", "--checkpoint-every", "2",
             "--no-progress", "--log-every", "1", "--no-normalize-inputs", "--no-init-b-dec"]   # no look at the head
    assert main(flags + ["--out-dir", str(tmp_path / "a")]) == 1
    line = _one_error_line(capsys.readouterr().err, "train")
    assert f"{two_files / 'part_1.npy'} has NaN or Inf in rows 300-301" in line
    # the rows are read (a buffer of 163 rows, blocks of 10) while filling step 7's batch
    assert "step 7" in line and "--skip-nonfinite" in line and "step_00000006" in line
    # resumed with --skip-nonfinite: the two rows are dropped and counted
    assert main(["train", "--resume", str(tmp_path / "a"), "--skip-nonfinite", "--steps", "10"]) == 0
    capsys.readouterr()
    metrics = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 11))
    assert [r.get("skipped_rows") for r in metrics] == [None] * 6 + [0, 2, 2, 2]
    assert all(torch.isfinite(p).all() for p in S.load(tmp_path / "a" / "final").parameters())


def test_nan_in_the_first_rows_is_named_before_training(tmp_path, data):
    bad = data.clone()
    bad[5, 0] = float("inf")
    with pytest.raises(NonFiniteDataError, match=r"\(in-memory tensor\) has NaN or Inf in row 5"):
        Trainer(_cfg(tmp_path / "a"), bad)
    assert not (tmp_path / "a" / "checkpoints").exists()
    loader = ActivationLoader(open_source(bad), 100, shuffle=False, skip_nonfinite=True)
    batches = [loader.next_batch() for _ in range(8)]
    assert [b.shape[0] for b in batches] == [99] + [100] * 7 and loader.skipped_rows == 1
    assert torch.equal(batches[0], torch.cat([bad[:5], bad[6:100]]))
    huge = torch.full((4, D), 3e38)                  # finite rows whose sum overflows: not refused
    check_finite_rows(open_source(huge), 0, huge)



def test_a_batch_that_leaves_a_process_no_finite_row_is_skipped_on_every_process(data):
    """With skip_nonfinite and 3 processes, a global batch in which one process's rows are all NaN
    is skipped whole by every process (an empty share would stop that process while the others
    wait in a collective); a batch with some bad rows in every share only drops those rows; data
    that never leaves a process a row is refused, not looped over."""
    bad = data[:210].clone()                # batches of 30 rows (10 a process), 7 an epoch
    bad[40:50, 1] = float("nan")            # batch 1: process 1's rows, all of them
    bad[95, 0] = float("inf")               # batch 3: one row of process 0
    loaders = [ActivationLoader(open_source(bad), 30, shuffle=False, rank=r, world_size=3, skip_nonfinite=True)
               for r in range(3)]
    got = [[loader.next_batch() for _ in range(4)] for loader in loaders]
    for r in range(3):
        want = [bad[r * 10:(r + 1) * 10]] + [bad[b * 30 + r * 10:b * 30 + (r + 1) * 10] for b in (2, 3, 4)]
        if r == 0:
            want[2] = torch.cat([bad[90:95], bad[96:100]])
        assert [torch.equal(g, w) for g, w in zip(got[r], want)] == [True] * 4, r
        assert loaders[r].skipped_rows == 30 + 1 and loaders[r].position == 150
    one = ActivationLoader(open_source(bad[30:60]), 30, shuffle=False, skip_nonfinite=True)
    assert one.next_batch().shape[0] == 20                      # one process: rows dropped, batch kept
    hopeless = bad.clone()
    hopeless[torch.arange(210) % 30 < 10] = float("nan")       # process 0's rows of every batch
    with pytest.raises(NonFiniteDataError, match="nothing to train on"):
        ActivationLoader(open_source(hopeless), 30, shuffle=False, rank=2, world_size=3,
                         skip_nonfinite=True).next_batch()


def test_eval_refuses_bad_embeddings_and_labels_naming_the_file(tmp_path, npy, data, capsys):
    run = tmp_path / "run"
    Trainer(_cfg(run, steps=2), str(npy)).fit()
    n = data.shape[0]
    emb = np.random.default_rng(0).standard_normal((n, 6)).astype(np.float32)
    emb[123, 2] = np.nan
    np.save(tmp_path / "emb_nan.npy", emb)
    np.save(tmp_path / "emb_long.npy", np.zeros((n + 5, 6), np.float32))
    np.save(tmp_path / "labels_short.npy", np.zeros(n - 1, np.int64))
    np.save(tmp_path / "labels_nan.npy", np.where(np.arange(n) == 7, np.nan, 1.0))
    base = ["eval", str(run), str(npy), "--out-dir", str(tmp_path / "ev"), "--no-plots", "--device", "cpu"]
    cases = [(["--embeddings", str(tmp_path / "emb_nan.npy")], f"embeddings {tmp_path / 'emb_nan.npy'} has NaN or "
                                                                "Inf in row 123"),
             (["--embeddings", str(tmp_path / "emb_long.npy")], f"{tmp_path / 'emb_long.npy'} has {n + 5} rows but "
                                                                 f"the activation data has {n}"),
             (["--embeddings", str(tmp_path / "missing.npy")], f"embeddings file {tmp_path / 'missing.npy'} not found"),
             (["--labels", str(tmp_path / "labels_short.npy")], f"{tmp_path / 'labels_short.npy'} has {n - 1} rows"),
             (["--labels", str(tmp_path / "labels_nan.npy")], "has NaN or Inf at entry 7")]
    for extra, message in cases:
        assert main(base + extra) == 1, extra
        assert message in _one_error_line(capsys.readouterr().err, "eval")
    assert not (tmp_path / "ev" / "report.json").exists()


# ---------------------------------------------------------------------------------------- 7. one-line errors


@pytest.mark.parametrize("limit, fails", [(20_000, "sae_weights.safetensors"),   # weights: about 33 kB
                                          (45_000, "trainer_state.pt")])         # optimizer state: about 66 kB
def test_a_failed_write_is_one_line_and_leaves_no_partial_checkpoint(tmp_path, npy, limit, fails):
    """A file-size limit (a full disk, reproducibly) while a checkpoint is written: safetensors raises
    SafetensorError and torch.save a RuntimeError ("enforce fail"); both are one line naming the file."""
    run = tmp_path / "run"
    flags = ["train", "--data", npy, "--out-dir", run, "--n-latents", 256, "--k", 4, "--batch-size", 32, "--steps",
             4, "--checkpoint-every", 2, "--no-progress"]
    proc = _cli(*flags, preexec_fn=lambda: _fsize_limit(limit))
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr, "train")
    assert f"could not write {run / 'checkpoints' / '.step_00000002.tmp' / fails}: " in line
    assert "File too large" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == []       # no half checkpoint left
    proc = _cli(*flags, "--debug", preexec_fn=lambda: _fsize_limit(limit))
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_an_unwritable_final_is_one_line(tmp_path, npy, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").write_text("a file where the final SAE's directory should go")
    assert main(["train", "--data", str(npy), "--out-dir", str(run), "--n-latents", "48", "--k", "4",
                 "--batch-size", "32", "--steps", "2", "--no-progress"]) == 1
    _one_error_line(capsys.readouterr().err, "train")
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only directory")
    (run / "final").unlink()
    (tmp_path / "run2" / "final").mkdir(parents=True)
    (tmp_path / "run2" / "final").chmod(0o555)
    assert main(["train", "--data", str(npy), "--out-dir", str(tmp_path / "run2"), "--n-latents", "48", "--k", "4",
                 "--batch-size", "32", "--steps", "2", "--no-progress"]) == 1
    assert "Permission denied" in _one_error_line(capsys.readouterr().err, "train")


@pytest.mark.parametrize("edit, message", [
    (lambda meta: [meta], "must hold a JSON object, got list"),
    (lambda meta: None, "must hold a JSON object, got NoneType"),
    (lambda meta: {k: v for k, v in meta.items() if k != "config"}, "has no 'config' object"),
    (lambda meta: {**meta, "dtype": "foo"}, "names dtype 'foo'"),
    (lambda meta: {**meta, "version": 99}, "format version 99"),
    (lambda meta: {**meta, "config": {**meta["config"], "n_latents": "many"}}, "does not describe a valid TopKSAE"),
])
def test_load_validates_the_config(tmp_path, capsys, edit, message):
    S.TopKSAE(D, 48, 4).save(tmp_path / "sae")
    path = tmp_path / "sae" / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=message):
        S.load(tmp_path / "sae")
    assert main(["export", str(tmp_path / "sae"), "saelens", str(tmp_path / "out")]) == 1
    assert message.split("'")[0] in _one_error_line(capsys.readouterr().err, "export")


# ---------------------------------------------------------------------------------------- 8. smaller
def test_load_returns_eval_mode(tmp_path, gen):
    sae = S.TopKSAE(D, 48, 4)
    sae.save(tmp_path)
    loaded = S.load(tmp_path)
    assert not loaded.training
    loaded.encode(torch.randn(8, D, generator=gen))
    assert int(loaded.tokens_since_fired.sum()) == 0         # inference updated no firing statistics


def test_npy_next_to_shards_is_named_and_oversized_batch_refused(tmp_path, data):
    from sparse_sae.io.extract import ShardWriter

    writer = ShardWriter(tmp_path / "acts", shard_rows=500)
    writer.add(data)
    writer.close()
    np.save(tmp_path / "acts" / "labels.npy", np.zeros(3))
    with pytest.warns(UserWarning, match="only the shards are read, ignoring labels.npy"):
        assert open_source(tmp_path / "acts").n_rows == data.shape[0]
    with pytest.raises(ValueError, match="batch_size 1000 exceeds the 800 rows of the data"):
        Trainer(_cfg(tmp_path / "run", batch_size=1000), data)
    assert not (tmp_path / "run").exists()
