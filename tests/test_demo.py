"""The demo (at a tiny size) and its synthetic data."""
import torch

from sparse_sae.eval.demo import VARIANTS, run_demo
from sparse_sae.eval.recovery import feature_recovery
from sparse_sae.eval.synthetic import make_synthetic
from sparse_sae.saes import TopKSAE


def test_demo_prints_table_and_writes_plot(tmp_path):
    lines = []
    results = run_demo(steps=4, batch_size=64, n_latents=128, k=4, n_features=256, d=32,
                       plot_path=tmp_path / "demo.png", progress=False, print_fn=lines.append)
    assert list(results) == list(VARIANTS)
    text = "\n".join(lines)
    for name in VARIANTS:
        assert f"| {name}" in text
    for row in results.values():
        assert 0 <= row["recovered"] <= 1 and row["fvu"] > 0 and row["rows_per_s"] > 0
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_synthetic_data_is_sparse_correlated_and_not_the_init():
    data = make_synthetic(n_features=600, d=40, mean_active=5, group_size=3, group_boost=0.5)
    rows, feats, _ = data.sample_codes(20000, torch.Generator().manual_seed(0))
    counts = torch.bincount(feats, minlength=600).float()
    assert 4 < len(feats) / 20000 < 12                         # sparse codes
    assert counts.max() > 50 * counts.median().clamp_min(1)      # power law: rare and common features
    fired = torch.zeros(20000, 600, dtype=torch.bool)
    fired[rows, feats] = True
    lead, member = fired[:, 0::3].float(), fired[:, 1::3].float()
    p_member_given_lead = (lead * member).sum() / lead.sum()
    assert p_member_given_lead > 0.45                            # correlated groups
    torch.manual_seed(0)                                         # an SAE's init must not match the dictionary
    assert feature_recovery(TopKSAE(40, 600, 4).W_dec, data.dictionary)["recovered"] == 0.0
