"""The trainer: exact resume after an interruption, NaN handling, config and data errors."""
import json

import pytest
import torch

import sparse_sae as S
from sparse_sae.training.checkpoint import latest_checkpoint
from sparse_sae.training.config import TrainConfig
from sparse_sae.training.metrics_log import read_metrics
from sparse_sae.training.trainer import NonFiniteLossError, Trainer, lr_at, penalty_scale_at

D = 24


def _cfg(out_dir, **kw):
    base = dict(steps=10, batch_size=64, n_latents=96, k=4, warmup_steps=2, checkpoint_every=4, log_every=1,
                out_dir=str(out_dir), progress=False, off_support_l1=0.1, l1_l2_ratio=0.01, auxk=0.05,
                dead_after_tokens=128, memory_budget_mb=0.02, penalty_warmup_steps=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def data(gen):
    return torch.randn(1000, D, generator=gen)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_is_bit_exact(tmp_path, data):
    Trainer(_cfg(tmp_path / "full"), data).fit()
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")

    def crash(trainer):
        if trainer.step == 6:
            raise _Interrupt
    with pytest.raises(_Interrupt):
        Trainer(_cfg(tmp_path / "cut"), data, on_step=crash).fit()
    assert latest_checkpoint(tmp_path / "cut").name == "step_00000004"
    Trainer(_cfg(tmp_path / "cut"), data, resume=tmp_path / "cut").fit()
    resumed = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    for a, b in zip(full, resumed):
        for key in ("loss", "fvu", "off_support_l1", "l1_l2_ratio", "auxk", "dead", "lr"):
            assert a[key] == b[key], (a["step"], key)
    s_full = S.load(tmp_path / "full" / "final")
    s_cut = S.load(tmp_path / "cut" / "final")
    for name, t in s_full.state_dict().items():
        assert torch.equal(t, s_cut.state_dict()[name]), name


def test_resume_rejects_another_configuration(tmp_path, data):
    Trainer(_cfg(tmp_path / "a", steps=4), data).fit()
    with pytest.raises(ValueError, match=r"another configuration.*k: checkpoint 4 vs now 5"):
        Trainer(_cfg(tmp_path / "a", steps=8, k=5), data, resume=tmp_path / "a")
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(_cfg(tmp_path / "a", steps=8), data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_cfg(tmp_path / "b"), data, resume=tmp_path / "b")


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, data):
    cfg = _cfg(tmp_path, steps=12, checkpoint_every=2, shuffle=False, batch_size=100, normalize_inputs=False,
               init_b_dec=False)
    bad = data.clone()
    bad[500:] *= 1e25          # finite inputs whose squares overflow float32: the loss becomes NaN
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* step 6.*step_00000004"):
        Trainer(cfg, bad).fit()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_00000004"
    sae = S.load(ckpt)
    assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_width_mismatch_and_bad_paths(tmp_path, data):
    Trainer(_cfg(tmp_path / "a", steps=2), data).fit()
    with pytest.raises(ValueError, match="width 23 but the SAE expects d_in=24"):
        Trainer(_cfg(tmp_path / "a", steps=4), data[:, :23], resume=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not found"):
        Trainer(_cfg(tmp_path / "b"), tmp_path / "missing")


def test_config_unknown_keys_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'warmup_step'.*did you mean 'warmup_steps'"):
        TrainConfig.from_dict({"warmup_step": 10})
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"k": 8, "steps": 5, "bogus": 1}))
    with pytest.raises(ValueError, match=f"config file {p} has unknown key"):
        TrainConfig.from_file(p)
    p.write_text(json.dumps({"k": 8, "steps": 5}))
    assert TrainConfig.from_file(p, lr=1e-2).lr == 1e-2
    t = tmp_path / "c.toml"
    t.write_text('k = 8\narchitecture = "batchtopk"\n')
    assert TrainConfig.from_file(t).architecture == "batchtopk"
    with pytest.raises(ValueError, match="architecture must be one of"):
        TrainConfig(architecture="sigmoid")
    with pytest.raises(ValueError, match="matryoshka_sizes is needed by"):
        TrainConfig(architecture="matryoshka")
    with pytest.raises(ValueError, match="matryoshka_sizes is needed by"):
        TrainConfig(matryoshka_sizes="8,32")
    with pytest.raises(ValueError, match="comma-separated integers"):
        TrainConfig(architecture="matryoshka", matryoshka_sizes="8,x")
    with pytest.raises(ValueError, match="l1_l2_ratio apply to topk"):
        TrainConfig(architecture="relu", l1_l2_ratio=0.1)


@pytest.mark.parametrize("arch", ["batchtopk", "relu", "jumprelu", "gated", "matryoshka"])
def test_other_architectures_train(tmp_path, data, arch):
    extra = {"relu": {"decoder_norm_l1": 1e-3}, "jumprelu": {"l0": 1e-3}, "gated": {"decoder_norm_l1": 1e-3},
             "matryoshka": {"matryoshka_sizes": "12,48"}}.get(arch, {})
    cfg = _cfg(tmp_path, architecture=arch, steps=3, off_support_l1=0.0, l1_l2_ratio=0.0, **extra)
    m = Trainer(cfg, data).fit()
    assert m["step"] == 3 and m["loss"] > 0


def test_schedules():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_start=0.5, penalty_warmup_steps=4)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == 1.0 and lr_at(49, cfg) == 1.0
    assert lr_at(75, cfg) == pytest.approx(0.5) and lr_at(99, cfg) == pytest.approx(0.02)
    assert [penalty_scale_at(s, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_tensorboard_needs_its_package(tmp_path):
    from sparse_sae.training.metrics_log import MetricsLog
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tensorboard"):
            MetricsLog(tmp_path / "m.jsonl", tmp_path / "tb")
    else:
        log = MetricsLog(tmp_path / "m.jsonl", tmp_path / "tb")
        log.write({"step": 1, "loss": 0.5})
        log.close()
        assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1, "loss": 0.5}]
