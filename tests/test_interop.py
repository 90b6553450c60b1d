"""Export to and import from the SAELens and sparsify on-disk formats, without those packages.

These tests check our side of the files (layout, the config rules, the folding math written out
here from SAELens's formulas, the CLI). tests/peers checks both directions against the real
libraries' own loaders and forward passes (`make test` runs it in .venv-peers).
"""
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparse_sae as S
from sparse_sae.cli import main
from sparse_sae.io import interop
from sparse_sae.io.extract import ShardWriter
from sparse_sae.io.interop import from_saelens, from_sparsify, read_saelens, read_sparsify, to_saelens, to_sparsify

D, F, K = 12, 40, 3
REQUIREMENTS = Path(__file__).resolve().parent.parent / "bench" / "peers" / "requirements.txt"


def _perturb(sae, gen):
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return sae


def _dense(sae, x):
    out = sae(x)
    return out.dense_code(), out.recon


def _saelens_dir(path, gen, cfg_extra=None, dtype=torch.float64, tensors_extra=None, arch="topk"):
    """A SAELens-layout directory with random weights and decoder rows of norm 0.5 to 1.5."""
    W_dec = torch.randn(F, D, generator=gen, dtype=dtype)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (0.5 + torch.rand(F, 1, generator=gen, dtype=dtype))
    t = {"W_enc": torch.randn(D, F, generator=gen, dtype=dtype) / D ** 0.5, "W_dec": W_dec,
         "b_enc": torch.randn(F, generator=gen, dtype=dtype) * 0.2, "b_dec": torch.randn(D, generator=gen, dtype=dtype)}
    t.update(tensors_extra or {})
    cfg = {"architecture": arch, "d_in": D, "d_sae": F, "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post"}}
    if arch == "topk":
        cfg["k"] = K
    cfg.update(cfg_extra or {})
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return t


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("make", [lambda: S.TopKSAE(D, F, K, input_scale=0.5),
                                  lambda: S.ReLUSAE(D, F, input_scale=2.0),
                                  lambda: S.JumpReLUSAE(D, F, init_threshold=0.05),
                                  lambda: S.GatedSAE(D, F, input_scale=0.5)])
def test_saelens_round_trip(tmp_path, gen, make):
    sae = _perturb(make(), gen).eval()
    to_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert (cfg["d_in"], cfg["d_sae"]) == (D, F)
    assert t["W_enc"].shape == (D, F) and t["W_dec"].shape == (F, D)
    back = from_saelens(tmp_path).eval()
    assert type(back) is type(sae)
    x = torch.randn(7, D, generator=gen)
    torch.testing.assert_close(back(x).recon, sae(x).recon, rtol=1e-5, atol=1e-5)


def test_sparsify_round_trip_and_layout(tmp_path, gen):
    sae = _perturb(S.TopKSAE(D, F, K, input_scale=0.25), gen).eval()
    to_sparsify(sae, tmp_path)
    t = load_file(str(tmp_path / "sae.safetensors"))
    assert set(t) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    assert t["encoder.weight"].shape == (F, D) and t["W_dec"].shape == (F, D)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["k"], cfg["num_latents"], cfg["d_in"]) == (K, F, D)
    back = from_sparsify(tmp_path).eval()
    x = torch.randn(7, D, generator=gen)
    torch.testing.assert_close(back(x).recon, sae(x).recon, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="Top-k SAEs only"):
        to_sparsify(S.ReLUSAE(D, F), tmp_path / "r")


def test_batchtopk_exports_as_jumprelu(tmp_path, gen):
    sae = _perturb(S.BatchTopKSAE(D, F, K), gen)
    with pytest.raises(ValueError, match="no learned threshold"):
        to_saelens(sae, tmp_path)
    sae(torch.randn(64, D, generator=gen))          # training mode: learns the threshold
    sae.eval()
    to_saelens(sae, tmp_path)
    back = from_saelens(tmp_path).eval()
    assert isinstance(back, S.JumpReLUSAE)
    x = torch.randn(9, D, generator=gen)
    torch.testing.assert_close(back(x).recon, sae(x).recon, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- SAELens config
def test_saelens_config_reads_as_current(tmp_path):
    to_saelens(S.TopKSAE(D, F, K), tmp_path, hook_name="blocks.3.hook_resid_post", model_name="gpt2")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    pinned = re.search(r"^sae-lens==(\S+)", REQUIREMENTS.read_text(), re.M).group(1)
    assert cfg["metadata"]["sae_lens_version"] == interop.SAELENS_FORMAT_VERSION == pinned
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["metadata"]["model_name"] == "gpt2"
    assert cfg["rescale_acts_by_decoder_norm"] is False and cfg["k"] == K
    assert read_saelens(tmp_path).activations == {"model": "gpt2", "hook_name": "blocks.3.hook_resid_post"}


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_saelens_rescale_acts_by_decoder_norm_is_folded(tmp_path, gen, arch):
    extra = {"k": K, "rescale_acts_by_decoder_norm": True} if arch == "topk" else {"k": K, "topk_threshold_lr": 0.02}
    tensors = {"topk_threshold": torch.tensor(0.3, dtype=torch.float64)} if arch == "batchtopk" else None
    t = _saelens_dir(tmp_path, gen, extra, tensors_extra=tensors, arch=arch)
    imported = read_saelens(tmp_path)
    sae = imported.sae.eval()
    assert any("rescale_acts_by_decoder_norm" in n for n in imported.notes)
    # SAELens's forward, written out: select on hidden_pre * ||W_dec_j||, decode acts / ||W_dec_j||
    x = torch.randn(9, D, generator=gen, dtype=torch.float64)
    n = t["W_dec"].norm(dim=-1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * n
    if arch == "topk":
        top = pre.topk(K, dim=-1)
        want = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    else:
        assert isinstance(sae, S.BatchTopKSAE) and sae.threshold_momentum == 0.02
        want = pre.relu() * (pre > 0.3)
    code, recon = _dense(sae, x)
    torch.testing.assert_close(code, want)
    torch.testing.assert_close(recon, (want / n) @ t["W_dec"] + t["b_dec"])


def test_saelens_apply_b_dec_to_input_false_is_folded(tmp_path, gen):
    t = _saelens_dir(tmp_path, gen, {"apply_b_dec_to_input": False})
    imported = read_saelens(tmp_path)
    x = torch.randn(9, D, generator=gen, dtype=torch.float64)
    pre = x @ t["W_enc"] + t["b_enc"]
    top = pre.topk(K, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    torch.testing.assert_close(_dense(imported.sae.eval(), x)[0], want)
    assert any("apply_b_dec_to_input" in n for n in imported.notes)


def test_saelens_keys_it_does_not_understand_are_refused(tmp_path, gen):
    _saelens_dir(tmp_path, gen, {"aux_loss_coefficient": 1.0, "decoder_init_norm": 0.1, "hook_layer": 3})
    notes = read_saelens(tmp_path).notes
    assert notes == ["training settings not carried over: aux_loss_coefficient=1.0, decoder_init_norm=0.1"]
    _saelens_dir(tmp_path, gen, {"mystery_scale": 2.0})
    with pytest.raises(ValueError, match=r"\['mystery_scale'\] are not understood"):
        from_saelens(tmp_path)
    # a key that belongs to another architecture is not silently dropped either
    _saelens_dir(tmp_path, gen, {"rescale_acts_by_decoder_norm": True}, arch="standard")
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        from_saelens(tmp_path)
    _saelens_dir(tmp_path, gen, {"normalize_activations": "expected_average_only_in"})
    with pytest.raises(ValueError, match="expected_average_only_in.*fold_activation_norm_scaling_factor"):
        from_saelens(tmp_path)


def test_saelens_pre_6_config(tmp_path, gen):
    """Names as SAELens's handle_pre_6_0_config maps them: no architecture, k in activation_fn_kwargs,
    hook_point and model_name at the top level."""
    old = {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "hook_point": "blocks.2.hook_resid_pre",
           "model_name": "gpt2-small", "hook_layer": 2, "normalize_activations": False, "finetuning_scaling_factor": False}
    _saelens_dir(tmp_path, gen, old, arch="topk")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key in ("architecture", "k", "metadata"):
        del cfg[key]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    imported = read_saelens(tmp_path)
    assert isinstance(imported.sae, S.TopKSAE) and imported.sae.k == K
    assert imported.activations == {"model": "gpt2-small", "hook_name": "blocks.2.hook_resid_pre"}
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "activation_fn_str": "relu", "activation_fn_kwargs": {}}))
    assert isinstance(from_saelens(tmp_path), S.ReLUSAE)
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "activation_fn_str": "relu"}))
    with pytest.raises(ValueError, match="activation_fn_kwargs"):
        from_saelens(tmp_path)


def test_import_errors(tmp_path, gen):
    with pytest.raises(FileNotFoundError, match="not a SAELens SAE directory"):
        from_saelens(tmp_path)
    _saelens_dir(tmp_path / "g", gen, arch="abstopk", cfg_extra={"k": K})
    with pytest.raises(ValueError, match="this is an AbsTopK SAE"):
        from_saelens(tmp_path / "g")
    _saelens_dir(tmp_path / "x", gen, tensors_extra={"W_skip": torch.zeros(D, D, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"\['W_skip'\] that sparse_sae has no counterpart for"):
        from_saelens(tmp_path / "x")
    (tmp_path / "x" / "sae_weights.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        from_saelens(tmp_path / "x")


# ---------------------------------------------------------------------------------------- sparsify config
def test_sparsify_normalize_decoder_is_truthful(tmp_path, gen):
    unit = _perturb(S.TopKSAE(D, F, K), gen)
    unit.normalize_decoder_()
    to_sparsify(unit, tmp_path / "unit")
    assert json.loads((tmp_path / "unit" / "cfg.json").read_text())["normalize_decoder"] is True
    scaled = S.TopKSAE(D, F, K, input_scale=0.02)       # folding divides the rows by the scale
    to_sparsify(scaled, tmp_path / "scaled")
    assert json.loads((tmp_path / "scaled" / "cfg.json").read_text())["normalize_decoder"] is False
    assert any("normalize_decoder: false" in n for n in interop.export_notes(scaled, "sparsify"))


def test_sparsify_keys_it_does_not_understand_are_refused(tmp_path, gen):
    to_sparsify(_perturb(S.TopKSAE(D, F, K), gen), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert read_sparsify(tmp_path).notes == ["training settings not carried over: multi_topk=False, "
                                             "normalize_decoder=False"]
    for extra, match in [({"tied": True}, r"\['tied'\] are not understood"), ({"transcode": True}, "transcoder"),
                         ({"activation": "groupmax"}, "groupmax"), ({"num_latents": F + 1}, "num_latents")]:
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, **extra}))
        with pytest.raises(ValueError, match=match):
            from_sparsify(tmp_path)


# ---------------------------------------------------------------------------------------- folders and notes
def test_a_folder_holds_one_sae(tmp_path, gen):
    sae = _perturb(S.TopKSAE(D, F, K), gen)
    to_saelens(sae, tmp_path)
    with pytest.raises(FileExistsError, match="holds a SAELens SAE.*folder of its own"):
        to_sparsify(sae, tmp_path)
    with pytest.raises(FileExistsError, match="already holds a SAELens SAE.*overwrite"):
        to_saelens(sae, tmp_path)
    to_saelens(sae, tmp_path, overwrite=True)
    with pytest.raises(FileExistsError, match="holds a SAELens or sparsify SAE"):
        sae.save(tmp_path)                       # would overwrite SAELens's sae_weights.safetensors
    sae.save(tmp_path / "native")
    with pytest.raises(FileExistsError, match="holds a sparse_sae SAE"):
        to_saelens(sae, tmp_path / "native", overwrite=True)
    to_sparsify(sae, tmp_path / "sp")
    with pytest.raises(FileExistsError, match="holds a sparsify SAE"):
        to_saelens(sae, tmp_path / "sp")


def test_export_notes_say_what_is_dropped_or_converted(gen):
    sae = S.TopKSAE(D, F, K, penalties=[S.OffSupportL1(0.02), S.L1L2Ratio(0.01)], auxk=S.AuxK(), input_scale=0.5)
    notes = " | ".join(interop.export_notes(sae, "saelens"))
    assert "input scale 0.5 folded" in notes and "OffSupportL1(0.02), L1L2Ratio(0.01), AuxK(" in notes
    btk = _perturb(S.BatchTopKSAE(D, F, K), gen)
    btk(torch.randn(64, D, generator=gen))
    notes = " | ".join(interop.export_notes(btk, "saelens"))
    assert f"JumpReLU with the learned global threshold {float(btk.threshold):.6g}" in notes and "k is not" in notes
    assert "bandwidth 0.001" in " ".join(interop.export_notes(S.JumpReLUSAE(D, F), "saelens"))


# ---------------------------------------------------------------------------------------- command line
def test_cli_export_takes_names_from_the_extracted_data(tmp_path, gen, capsys):
    acts = tmp_path / "acts"
    writer = ShardWriter(acts, 256, metadata={"model": "facebook/dinov2-small", "layer": 9, "tokens": "patch",
                                              "kind": "vision", "inputs": "photos"})
    writer.add(torch.randn(300, D, generator=gen))
    writer.close()
    run = tmp_path / "run"
    assert main(["train", "--data", str(acts), "--k", "3", "--n-latents", "32", "--steps", "3", "--batch-size",
                 "32", "--out-dir", str(run), "--no-progress"]) == 0
    assert S.serialization.saved_activations(run / "final") == {"model": "facebook/dinov2-small", "layer": 9,
                                                                 "tokens": "patch", "kind": "vision"}
    capsys.readouterr()
    assert main(["export", str(run), "saelens", str(tmp_path / "lens")]) == 0
    out = capsys.readouterr().out
    assert "model_name: 'facebook/dinov2-small' (recorded with the SAE)" in out and "hidden_states.9" in out
    meta = json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == ("facebook/dinov2-small", "hidden_states.9")
    assert main(["export", str(run), "saelens", str(tmp_path / "lens"), "--overwrite", "--hook-name",
                 "blocks.8.hook_resid_post"]) == 0
    meta = json.loads((tmp_path / "lens" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.8.hook_resid_post"
    assert main(["export", str(run), "sparsify", str(tmp_path / "lens")]) == 1
    assert "holds a SAELens SAE" in capsys.readouterr().err
    assert main(["export", str(run), "sparsify", str(tmp_path / "sp"), "--model-name", "x"]) == 1
    assert "sparsify's format has no place for them" in capsys.readouterr().err


def test_cli_import_and_export_again(tmp_path, gen, capsys):
    _saelens_dir(tmp_path / "lens", gen, {"rescale_acts_by_decoder_norm": True, "aux_loss_coefficient": 1.0})
    assert main(["import", "saelens", str(tmp_path / "lens"), str(tmp_path / "mine")]) == 0
    out = capsys.readouterr().out
    assert "imported saelens SAE as TopKSAE (12 -> 40)" in out and "model='gpt2'" in out
    assert "rescale_acts_by_decoder_norm=true: decoder norms folded" in out and "aux_loss_coefficient=1.0" in out
    x = torch.randn(9, D, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(_dense(S.load(tmp_path / "mine").eval(), x),
                               _dense(from_saelens(tmp_path / "lens").eval(), x))
    # the names kept by the import go back out with the next export
    assert main(["export", str(tmp_path / "mine"), "saelens", str(tmp_path / "again")]) == 0
    meta = json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"]
    assert (meta["model_name"], meta["hook_name"]) == ("gpt2", "blocks.3.hook_resid_post")
    assert main(["import", "saelens", str(tmp_path / "lens"), str(tmp_path / "mine")]) == 1
    assert "already holds a sparse_sae SAE" in capsys.readouterr().err
    assert main(["import", "sparsify", str(tmp_path / "lens"), str(tmp_path / "other")]) == 1
    assert "not a sparsify SAE directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["import", "export"])
def test_cli_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: sparse-sae" in capsys.readouterr().out


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_saelens_gated_import_computes_saelens_formula(tmp_path, gen, apply_b_dec_to_input):
    """A SAELens gated SAE's files imported: the code equals SAELens's GatedSAE.encode written out
    here from its definition (gate x' @ W_enc + b_gate > 0 times relu(x' @ (W_enc * exp(r_mag)) +
    b_mag), x' = x - b_dec only when apply_b_dec_to_input)."""
    t = _saelens_dir(tmp_path, gen, {"apply_b_dec_to_input": apply_b_dec_to_input}, arch="gated",
                     tensors_extra={"r_mag": torch.rand(F, generator=gen, dtype=torch.float64) - 0.5,
                                    "b_mag": torch.randn(F, generator=gen, dtype=torch.float64) * 0.3})
    t["b_gate"] = t.pop("b_enc")
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    x = torch.randn(29, D, generator=gen, dtype=torch.float64)
    xin = x - t["b_dec"] if apply_b_dec_to_input else x
    gate = (xin @ t["W_enc"] + t["b_gate"]) > 0
    want = gate * torch.relu(xin @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    sae = from_saelens(tmp_path)
    assert isinstance(sae, S.GatedSAE)
    out = sae(x)
    assert 0 < float(gate.double().mean()) < 1
    torch.testing.assert_close(out.dense_code(), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.recon, want @ t["W_dec"] + t["b_dec"], rtol=1e-10, atol=1e-12)
