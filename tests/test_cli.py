"""The command line: help, train from a config file, resume, export, data-parallel training."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sparse_sae as S
from sparse_sae.cli import main
from sparse_sae.training.config import TrainConfig
from sparse_sae.training.trainer import Trainer

D = 16


@pytest.fixture
def npy(tmp_path, gen):
    path = tmp_path / "acts.npy"
    np.save(path, torch.randn(600, D, generator=gen).numpy())
    return path


@pytest.mark.parametrize("command", [[], ["train"], ["extract"], ["demo"], ["export"], ["info"]])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main(command + ["--help"])
    assert exc.value.code == 0
    assert "usage: sparse-sae" in capsys.readouterr().out


def test_optional_commands_are_wired(capsys):
    try:
        import sparse_sae.cli.eval  # noqa: F401
    except ModuleNotFoundError:
        assert main(["eval", "x"]) == 2
        assert "not available yet" in capsys.readouterr().err


def test_train_config_file_resume_and_export(tmp_path, npy, capsys):
    run = tmp_path / "run"
    cfg = {"data": str(npy), "n_latents": 48, "k": 4, "batch_size": 32, "steps": 4, "checkpoint_every": 2,
           "warmup_steps": 1, "out_dir": str(run), "progress": False}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "run.json"), "--off-support-l1", "0.01"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out
    sae = S.load(run / "final")
    assert sae.penalties == (S.OffSupportL1(0.01),)
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 0
    assert "trained 6 steps" in capsys.readouterr().out
    assert main(["train", "--resume", str(run), "--steps", "8", "--k", "5"]) == 1
    assert "another configuration" in capsys.readouterr().err
    assert main(["export", str(run), "saelens", str(tmp_path / "lens")]) == 0
    assert (tmp_path / "lens" / "cfg.json").is_file()
    (tmp_path / "bad.json").write_text(json.dumps({**cfg, "lr_warmup": 3}))
    assert main(["train", "--config", str(tmp_path / "bad.json")]) == 1
    assert "unknown key(s) 'lr_warmup'" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nothing.npy"), "--out-dir", str(tmp_path / "x")]) == 1
    assert "not found" in capsys.readouterr().err


def test_two_gloo_processes_match_one_process(tmp_path, npy):
    """torchrun with 2 CPU processes (gloo) gives the weights of 1 process on the same global batch."""
    args = dict(data=str(npy), n_latents=48, k=4, batch_size=64, steps=5, warmup_steps=1, auxk=0.0,
                dead_after_tokens=100, progress=False, device="cpu")
    Trainer(TrainConfig(**args, out_dir=str(tmp_path / "one"))).fit()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k != "progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "sparse_sae", "train", *flags, "--no-progress", f"--out-dir={tmp_path / 'two'}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = S.load(tmp_path / "one" / "final"), S.load(tmp_path / "two" / "final")
    for name, t in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], t, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(one.W_enc, S.TopKSAE(D, 48, 4).W_enc)
