"""Export to and import from the SAELens and sparsify on-disk formats."""
import json

import pytest
import torch
from safetensors.torch import load_file

import sparse_sae as S
from sparse_sae.interop import from_saelens, from_sparsify, to_saelens, to_sparsify

D, F, K = 12, 40, 3


def _perturb(sae, gen):
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return sae


@pytest.mark.parametrize("make", [lambda: S.TopKSAE(D, F, K, input_scale=0.5),
                                  lambda: S.ReLUSAE(D, F, input_scale=2.0),
                                  lambda: S.JumpReLUSAE(D, F, init_threshold=0.05)])
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


def test_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a SAELens SAE directory"):
        from_saelens(tmp_path)
    to_saelens(S.TopKSAE(D, F, K), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="architecture 'gated' is not supported"):
        from_saelens(tmp_path)
    (tmp_path / "sae_weights.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        from_saelens(tmp_path)
