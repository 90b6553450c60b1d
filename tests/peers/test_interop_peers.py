"""Export and import checked against SAELens's and sparsify's own constructors, save and load
functions and forward passes (the oracle), on random non-trivial weights: decoder rows of norm
0.5 to 1.5, non-zero biases, thresholds that gate part of the latents."""
import os

import pytest
import torch

_WHY = (os.environ.get("SPARSE_SAE_PEERS_UNAVAILABLE")
        or "sae_lens and sparsify are not installed here (make test-peers)")
sae_lens = pytest.importorskip("sae_lens", reason=_WHY)
sparsify = pytest.importorskip("sparsify", reason=_WHY)

import sparse_sae as S  # noqa: E402
from sparse_sae.cli import main  # noqa: E402
from sparse_sae.io import interop  # noqa: E402

D, F, K, B = 64, 256, 8, 32


def _tol(dtype):
    return {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}


def _weights(gen, dtype):
    """``W_enc (F x D)``, ``b_enc``, ``W_dec (F x D)`` with row norms in [0.5, 1.5], ``b_dec``."""
    W_dec = torch.randn(F, D, generator=gen, dtype=torch.float64)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (0.5 + torch.rand(F, 1, generator=gen, dtype=torch.float64))
    W_enc = torch.randn(F, D, generator=gen, dtype=torch.float64) / D ** 0.5
    b_enc = torch.randn(F, generator=gen, dtype=torch.float64) * 0.3
    b_dec = torch.randn(D, generator=gen, dtype=torch.float64) * 0.5
    return [t.to(dtype) for t in (W_enc, b_enc, W_dec, b_dec)]


def _thresholds(gen, dtype):
    return (0.2 + 0.8 * torch.rand(F, generator=gen, dtype=torch.float64)).to(dtype)


def _magnitude_path(gen, dtype):
    """A Gated SAE's ``r_mag`` and ``b_mag``: magnitudes scaled by 0.5 to 2, shifted both ways."""
    return {"r_mag": (torch.rand(F, generator=gen, dtype=torch.float64) * 1.4 - 0.7).to(dtype),
            "b_mag": (torch.randn(F, generator=gen, dtype=torch.float64) * 0.3).to(dtype)}


def _x(gen, dtype):
    return torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)


def _ours(sae, x):
    out = sae.eval()(x)
    return out.dense_code(), out.recon


def _lens(peer, x):
    with torch.no_grad():
        code = peer.encode(x)
        return code, peer.decode(code)


def _sparsify(peer, x):
    with torch.no_grad():
        enc = peer.encode(x)
        code = torch.zeros(x.shape[0], peer.num_latents, dtype=x.dtype).scatter(1, enc.top_indices,
                                                                                enc.top_acts.to(x.dtype))
        return code, peer.decode(enc.top_acts, enc.top_indices)


def _assert_same(got, want, dtype, what):
    (code, recon), (want_code, want_recon) = got, want
    assert torch.equal(code != 0, want_code != 0), f"{what}: different latents selected"
    torch.testing.assert_close(code, want_code.to(code.dtype), **_tol(dtype), msg=lambda m: f"{what} codes: {m}")
    torch.testing.assert_close(recon, want_recon.to(recon.dtype), **_tol(dtype),
                               msg=lambda m: f"{what} reconstruction: {m}")


def _set(module, gen, dtype, **extra):
    W_enc, b_enc, W_dec, b_dec = _weights(gen, dtype)
    with torch.no_grad():
        module.W_enc.copy_(W_enc if module.W_enc.shape == W_enc.shape else W_enc.T)
        module.b_enc.copy_(b_enc)
        module.W_dec.copy_(W_dec)
        module.b_dec.copy_(b_dec)
        for name, value in extra.items():
            getattr(module, name).copy_(value)
    return module


# ---------------------------------------------------------------------------------------- ours -> peers
def _our_sae(arch, gen, dtype, input_scale):
    if arch == "topk":
        sae = S.TopKSAE(D, F, K, penalties=[S.OffSupportL1(0.02)], auxk=S.AuxK(), input_scale=input_scale, dtype=dtype)
    elif arch == "batchtopk":
        sae = S.BatchTopKSAE(D, F, K, input_scale=input_scale, dtype=dtype)
    elif arch == "jumprelu":
        sae = S.JumpReLUSAE(D, F, input_scale=input_scale, dtype=dtype)
    elif arch == "gated":
        sae = S.GatedSAE(D, F, [S.DecoderNormL1(0.1)], input_scale=input_scale, dtype=dtype)
    else:
        sae = S.ReLUSAE(D, F, input_scale=input_scale, dtype=dtype)
    extra = {"log_threshold": _thresholds(gen, dtype).log()} if arch == "jumprelu" else {}
    if arch == "gated":
        extra = _magnitude_path(gen, dtype)
    _set(sae, gen, dtype, **extra)
    if arch == "batchtopk":
        sae.train()(_x(gen, dtype))           # learns its global threshold
    return sae.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_scale", [None, 0.5])
@pytest.mark.parametrize("arch,peer_class", [("topk", "TopKSAE"), ("batchtopk", "JumpReLUSAE"),
                                             ("jumprelu", "JumpReLUSAE"), ("relu", "StandardSAE"),
                                             ("gated", "GatedSAE")])
def test_saelens_loads_our_export(tmp_path, gen, arch, peer_class, input_scale, dtype):
    sae = _our_sae(arch, gen, dtype, input_scale)
    interop.to_saelens(sae, tmp_path, hook_name="blocks.3.hook_resid_post", model_name="gpt2")
    peer = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(peer).__name__ == peer_class and peer.dtype == dtype
    # read as a current (6.x) config: the metadata survives
    assert (peer.cfg.metadata.hook_name, peer.cfg.metadata.model_name) == ("blocks.3.hook_resid_post", "gpt2")
    x = _x(gen, dtype)
    _assert_same(_ours(sae, x), _lens(peer, x), dtype, f"SAELens {peer_class}")
    if arch == "topk":                       # its training class defaults the rescaling to on
        trainer_peer = sae_lens.TopKTrainingSAE.load_from_disk(tmp_path)
        assert trainer_peer.cfg.rescale_acts_by_decoder_norm is False
        _assert_same(_ours(sae, x), _lens(trainer_peer, x), dtype, "SAELens TopKTrainingSAE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("input_scale", [None, 0.5])
def test_sparsify_loads_our_export(tmp_path, gen, input_scale, dtype):
    sae = _our_sae("topk", gen, dtype, input_scale)
    interop.to_sparsify(sae, tmp_path)
    peer = sparsify.SparseCoder.load_from_disk(tmp_path)
    assert peer.dtype == dtype and peer.cfg.normalize_decoder is False    # rows of norm 0.5-1.5
    x = _x(gen, dtype)
    _assert_same(_ours(sae, x), _sparsify(peer, x), dtype, "sparsify")


def test_sparsify_normalize_decoder_is_true_only_for_unit_rows(tmp_path, gen):
    sae = _our_sae("topk", gen, torch.float32, None)
    sae.normalize_decoder_()
    interop.to_sparsify(sae, tmp_path)
    assert sparsify.SparseCoder.load_from_disk(tmp_path).cfg.normalize_decoder is True


# ---------------------------------------------------------------------------------------- peers -> ours
def _lens_topk(gen, dtype, training, rescale):
    cls, cfg_cls = ((sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig) if training
                    else (sae_lens.TopKSAE, sae_lens.TopKSAEConfig))
    kw = {} if rescale is None else {"rescale_acts_by_decoder_norm": rescale}
    return _set(cls(cfg_cls(d_in=D, d_sae=F, k=K, dtype=str(dtype).removeprefix("torch."), **kw)), gen, dtype)


def _lens_jumprelu(gen, dtype, training):
    cls, cfg_cls = ((sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig) if training
                    else (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig))
    peer = cls(cfg_cls(d_in=D, d_sae=F, dtype=str(dtype).removeprefix("torch.")))
    return _set(peer, gen, dtype, threshold=_thresholds(gen, peer.threshold.dtype))


def _lens_standard(gen, dtype, training, apply_b_dec_to_input=True):
    cls, cfg_cls = ((sae_lens.StandardTrainingSAE, sae_lens.StandardTrainingSAEConfig) if training
                    else (sae_lens.StandardSAE, sae_lens.StandardSAEConfig))
    return _set(cls(cfg_cls(d_in=D, d_sae=F, dtype=str(dtype).removeprefix("torch."),
                            apply_b_dec_to_input=apply_b_dec_to_input)), gen, dtype)


def _lens_gated(gen, dtype, training, apply_b_dec_to_input=True):
    cls, cfg_cls = ((sae_lens.GatedTrainingSAE, sae_lens.GatedTrainingSAEConfig) if training
                    else (sae_lens.GatedSAE, sae_lens.GatedSAEConfig))
    peer = cls(cfg_cls(d_in=D, d_sae=F, dtype=str(dtype).removeprefix("torch."),
                       apply_b_dec_to_input=apply_b_dec_to_input))
    W_enc, b_gate, W_dec, b_dec = _weights(gen, dtype)
    with torch.no_grad():          # SAELens's gated SAE has b_gate in place of b_enc
        for name, value in dict(W_enc=W_enc.T, b_gate=b_gate, W_dec=W_dec, b_dec=b_dec,
                                **_magnitude_path(gen, dtype)).items():
            getattr(peer, name).copy_(value)
    return peer


PEERS = {
    "GatedSAE": lambda gen, dt: _lens_gated(gen, dt, False),
    "GatedTrainingSAE": lambda gen, dt: _lens_gated(gen, dt, True),
    "GatedSAE without b_dec on the input": lambda gen, dt: _lens_gated(gen, dt, False, False),
    "TopKSAE": lambda gen, dt: _lens_topk(gen, dt, False, None),
    "TopKSAE rescaled": lambda gen, dt: _lens_topk(gen, dt, False, True),
    "TopKTrainingSAE (rescales by default)": lambda gen, dt: _lens_topk(gen, dt, True, None),
    "TopKTrainingSAE not rescaled": lambda gen, dt: _lens_topk(gen, dt, True, False),
    "JumpReLUSAE": lambda gen, dt: _lens_jumprelu(gen, dt, False),
    "JumpReLUTrainingSAE": lambda gen, dt: _lens_jumprelu(gen, dt, True),
    "StandardSAE": lambda gen, dt: _lens_standard(gen, dt, False),
    "StandardTrainingSAE": lambda gen, dt: _lens_standard(gen, dt, True),
    "StandardSAE without b_dec on the input": lambda gen, dt: _lens_standard(gen, dt, False, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(PEERS))
def test_we_load_what_saelens_saves(tmp_path, gen, name, dtype):
    peer = PEERS[name](gen, dtype)
    peer.save_model(tmp_path)
    loaded = sae_lens.SAE.load_from_disk(tmp_path)          # the peer's own reading of its files
    x = _x(gen, dtype)
    want = _lens(loaded, x)
    _assert_same(_lens(peer, x), want, dtype, f"{name} in memory vs loaded")
    imported = interop.read_saelens(tmp_path)
    _assert_same(_ours(imported.sae, x), want, dtype, name)
    assert imported.sae.W_enc.dtype == dtype


def test_batchtopk_training_checkpoint(tmp_path, gen):
    """A BatchTopK trainer checkpoint (architecture batchtopk) imports as our BatchTopKSAE and runs
    like the JumpReLU inference SAE that SAELens itself writes from it."""
    peer = _set(sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=K)),
                gen, torch.float32)
    peer.topk_threshold.fill_(0.8)
    peer.save_model(tmp_path / "ckpt")
    peer.save_inference_model(tmp_path / "inference")
    oracle = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    assert type(oracle).__name__ == "JumpReLUSAE"
    x = _x(gen, torch.float32)
    want = _lens(oracle, x)
    ours = interop.from_saelens(tmp_path / "ckpt")
    assert isinstance(ours, S.BatchTopKSAE) and ours.k == K
    _assert_same(_ours(ours, x), want, torch.float32, "BatchTopK checkpoint")
    _assert_same(_ours(interop.from_saelens(tmp_path / "inference"), x), want, torch.float32, "BatchTopK inference")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize_decoder", [True, False])
def test_we_load_what_sparsify_saves(tmp_path, gen, dtype, normalize_decoder):
    cfg = sparsify.SparseCoderConfig(k=K, num_latents=F, normalize_decoder=normalize_decoder, multi_topk=True)
    peer = sparsify.SparseCoder(D, cfg, dtype=dtype)
    W_enc, b_enc, W_dec, b_dec = _weights(gen, dtype)
    with torch.no_grad():
        peer.encoder.weight.copy_(W_enc)
        peer.encoder.bias.copy_(b_enc)
        peer.W_dec.copy_(W_dec)
        peer.b_dec.copy_(b_dec)
    peer.save_to_disk(tmp_path)
    loaded = sparsify.SparseCoder.load_from_disk(tmp_path)
    x = _x(gen, dtype)
    want = _sparsify(loaded, x)
    imported = interop.read_sparsify(tmp_path)
    _assert_same(_ours(imported.sae, x), want, dtype, "sparsify")
    assert any("multi_topk=True" in n for n in imported.notes)


@pytest.mark.parametrize("cfg,match", [({"transcode": True}, "transcoder"), ({"skip_connection": True}, "skip"),
                                       ({"activation": "groupmax"}, "groupmax")])
def test_sparsify_variants_we_cannot_hold_are_refused(tmp_path, cfg, match):
    sparsify.SparseCoder(D, sparsify.SparseCoderConfig(k=K, num_latents=F, **cfg)).save_to_disk(tmp_path)
    with pytest.raises(ValueError, match=match):
        interop.from_sparsify(tmp_path)


# ---------------------------------------------------------------------------------------- the command line
def test_cli_import_then_export_keeps_the_saelens_sae(tmp_path, gen, capsys):
    """A SAELens trainer checkpoint (rescaling on) through `sparse-sae import` and `export`: SAELens
    loads the result and computes the codes and reconstructions of the original, under its names."""
    peer = _lens_topk(gen, torch.float32, True, None)
    peer.cfg.metadata.model_name, peer.cfg.metadata.hook_name = "gpt2", "blocks.5.hook_resid_post"
    peer.save_model(tmp_path / "lens")
    assert main(["import", "saelens", str(tmp_path / "lens"), str(tmp_path / "ours")]) == 0
    assert "decoder norms folded" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "ours"), "saelens", str(tmp_path / "back")]) == 0
    back = sae_lens.SAE.load_from_disk(tmp_path / "back")
    assert (back.cfg.metadata.model_name, back.cfg.metadata.hook_name) == ("gpt2", "blocks.5.hook_resid_post")
    x = _x(gen, torch.float32)
    _assert_same(_lens(back, x), _lens(peer, x), torch.float32, "import + export")
