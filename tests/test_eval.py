"""Evaluation: every metric against an independent direct computation, and `sparse-sae eval`
end to end on a tiny saved SAE."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import sparse_sae as S
from sparse_sae import reference
from sparse_sae.cli import main
from sparse_sae.eval import (
    MonosemanticityAccumulator,
    ReconstructionStats,
    SparseCodes,
    density_histogram,
    evaluate,
    feature_recovery,
    fit_logistic,
    forward_at_k,
    k_values,
    linear_sum_assignment,
    monosemanticity,
    probe,
    top_latents_per_class,
    write_report,
)


# ------------------------------------------------------------------ reconstruction and sparsity
def test_reconstruction_metrics_match_direct(gen):
    n, d, f, w = 53, 7, 19, 5
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.5 + 3.0      # a large mean
    x_hat = x + 0.4 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    values = torch.rand(n, w, generator=gen, dtype=torch.float64)
    values[values < 0.3] = 0                                                     # padding / inactive entries
    values[4] = 0                                                                # an all-zero row
    indices = torch.stack([torch.randperm(f - 4, generator=gen)[:w] for _ in range(n)])   # latents 15.. never fire
    stats = ReconstructionStats(f)
    for a, b in ((0, 1), (1, 20), (20, 53)):                                     # uneven batches, one of 1 row
        stats.update(x[a:b], x_hat[a:b], values[a:b], indices[a:b])
    got = stats.compute()

    xn, xhn = x.numpy(), x_hat.numpy()
    sse = ((xn - xhn) ** 2).sum()
    sst = ((xn - xn.mean(0)) ** 2).sum()
    assert got["fvu"] == pytest.approx(sse / sst, rel=1e-12)
    assert got["explained_variance"] == pytest.approx(1 - sse / sst, rel=1e-12)
    assert got["explained_variance"] < 1 - sse / (xn ** 2).sum()               # not against zero
    assert got["mse"] == pytest.approx(sse / (n * d), rel=1e-12)
    cos = [float(np.dot(xn[i], xhn[i]) / np.linalg.norm(xn[i]) / np.linalg.norm(xhn[i])) for i in range(n)]
    assert got["cosine_similarity"] == pytest.approx(np.mean(cos), rel=1e-12)
    vn = values.numpy()
    assert got["l0"] == pytest.approx((vn != 0).sum() / n)
    eff = [(np.abs(r).sum() / np.linalg.norm(r)) ** 2 if np.any(r) else 0.0 for r in vn]
    assert got["effective_active_units"] == pytest.approx(np.mean(eff), rel=1e-12)
    fired = np.zeros(f)
    for i in range(n):
        for j in range(w):
            if vn[i, j] != 0:
                fired[indices[i, j]] += 1
    assert got["dead_fraction"] == pytest.approx((fired == 0).mean())
    assert got["dead_window_rows"] == n
    dens = got["density"]
    assert dens["never_fired"] == int((fired == 0).sum())
    want, _ = np.histogram(np.log10(fired[fired > 0] / n), bins=np.array(dens["log10_edges"]))
    assert dens["counts"] == want.tolist()


def test_density_histogram_all_dead():
    assert density_histogram(torch.zeros(6))["never_fired"] == 6


# ------------------------------------------------------------------ monosemanticity
def ms_direct(a, e):
    """The definition: min-max scaling, then the O(N^2) pairwise sums, in float64."""
    a, e = a.double(), e.double()
    norms = e.norm(dim=1, keepdim=True)
    en = torch.where(norms > 0, e / norms.clamp_min(1e-300), torch.zeros_like(e))
    cos = en @ en.T
    out = []
    for f in range(a.shape[1]):
        col = a[:, f]
        lo, hi = col.min(), col.max()
        if hi == lo:
            out.append(math.nan)
            continue
        s = (col - lo) / (hi - lo)
        num = den = 0.0
        for i in range(len(s)):
            for j in range(i + 1, len(s)):
                num += float(s[i] * s[j] * cos[i, j])
                den += float(s[i] * s[j])
        out.append(num / den if den > 0 else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def ms_inputs(gen, n=37, f=13, e=7):
    a = torch.relu(torch.randn(n, f, generator=gen) - 0.6)
    a[:, 2] = 0                                     # never fires
    a[:, 5] = 0
    a[9, 5] = 1.7                                   # fires on one input only: no pair
    a[:, 7] += 0.5                                  # fires everywhere: min-max shift matters
    emb = torch.randn(n, e, generator=gen)
    emb[3] = 0                                      # an all-zero embedding: cosine 0
    return a, emb


def test_monosemanticity_matches_pairwise_sum(gen):
    a, emb = ms_inputs(gen)
    want = ms_direct(a, emb)
    assert torch.isnan(want[2]) and torch.isnan(want[5]) and not torch.isnan(want[7])
    for kwargs in ({}, {"latent_batch": 3}):
        torch.testing.assert_close(monosemanticity(a, emb, **kwargs), want, equal_nan=True, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(monosemanticity(a, emb.to_sparse()), want, equal_nan=True, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(monosemanticity(a.double(), emb.double() * 3.1), want, equal_nan=True,
                               rtol=1e-10, atol=1e-12)        # scale of the embeddings is irrelevant


def test_monosemanticity_accumulator_matches(gen):
    a, emb = ms_inputs(gen, n=41, f=11, e=5)
    want = ms_direct(a, emb)
    acc = MonosemanticityAccumulator(a.shape[1], emb.shape[1])
    v, i = a.topk(6, dim=1)                        # sparse batches: only 6 stored per row, rest implicit 0
    dense_rows = slice(30, 41)
    sparse_a = torch.zeros_like(a).scatter_(1, i, v)
    acc.update(emb[:1], values=v[:1], indices=i[:1])
    acc.update(emb[1:30], values=v[1:30], indices=i[1:30])
    acc.update(emb[dense_rows], activations=sparse_a[dense_rows])
    full = torch.cat([sparse_a[:30], sparse_a[dense_rows]])
    torch.testing.assert_close(acc.compute(), ms_direct(full, emb), equal_nan=True, rtol=1e-10, atol=1e-12)
    acc2 = MonosemanticityAccumulator(a.shape[1], emb.shape[1])
    acc2.update(emb, activations=a)
    torch.testing.assert_close(acc2.compute(), want, equal_nan=True, rtol=1e-10, atol=1e-12)


def test_monosemanticity_extremes():
    e = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 5.0]])
    a = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    ms = monosemanticity(a, e)
    assert ms[0] == pytest.approx(1.0)             # fires on two inputs with the same direction
    assert ms[1] == pytest.approx(0.0)             # fires on two orthogonal inputs


def test_monosemanticity_bad_input():
    with pytest.raises(ValueError, match="rows"):
        monosemanticity(torch.rand(5, 3), torch.rand(4, 2))
    with pytest.raises(ValueError, match="finite"):
        monosemanticity(torch.tensor([[1.0], [float("nan")]]), torch.rand(2, 2))
    with pytest.raises(TypeError):
        monosemanticity(torch.ones(3, 2, dtype=torch.int64), torch.rand(3, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_monosemanticity_cuda(gen):
    a, emb = ms_inputs(gen)
    got = monosemanticity(a.cuda(), emb.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), ms_direct(a, emb), equal_nan=True, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ ground-truth recovery
def brute_force_assignment(score):
    n, m = score.shape
    best = -math.inf
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            best = max(best, sum(score[i, c] for i, c in enumerate(cols)))
    else:
        for rows in itertools.permutations(range(n), m):
            best = max(best, sum(score[r, j] for j, r in enumerate(rows)))
    return best


@pytest.mark.parametrize("shape", [(1, 1), (4, 6), (6, 4), (5, 5)])
def test_linear_sum_assignment_exact(gen, shape):
    cost = torch.rand(*shape, generator=gen, dtype=torch.float64).numpy()
    cost[0, :] = cost[0, 0]                          # ties
    r, c = linear_sum_assignment(cost)
    assert len(set(r.tolist())) == len(r) == min(shape) and len(set(c.tolist())) == len(c)
    assert cost[r, c].sum() == pytest.approx(-brute_force_assignment(-cost), abs=1e-12)


def test_linear_sum_assignment_matches_scipy(gen):
    scipy_opt = pytest.importorskip("scipy.optimize")
    cost = torch.rand(60, 85, generator=gen, dtype=torch.float64).numpy()
    r, c = linear_sum_assignment(cost)
    r2, c2 = scipy_opt.linear_sum_assignment(cost)
    assert cost[r, c].sum() == pytest.approx(cost[r2, c2].sum(), abs=1e-10)


@pytest.mark.parametrize("use_scipy", [True, False])
def test_feature_recovery_matches_direct(gen, monkeypatch, use_scipy):
    if use_scipy:
        pytest.importorskip("scipy")
    else:
        import builtins
        real_import = builtins.__import__

        def no_scipy(name, *args, **kwargs):
            if name.startswith("scipy"):
                raise ImportError("no scipy")
            return real_import(name, *args, **kwargs)
        monkeypatch.setattr(builtins, "__import__", no_scipy)
    dictionary = torch.randn(5, 9, generator=gen)
    W_dec = torch.randn(7, 9, generator=gen) * 2.5
    W_dec[3] = dictionary[1] * 0.7 + 0.01 * torch.randn(9, generator=gen)     # recovered, scaled
    W_dec[5] = dictionary[1] * 1.3                                              # the same feature twice
    got = feature_recovery(W_dec, dictionary, threshold=0.9)
    cos = np.array([[float(torch.dot(t, w) / t.norm() / w.norm()) for w in W_dec.double()]
                    for t in dictionary.double()])
    assert got["mean_max_cos"] == pytest.approx(cos.max(1).mean(), rel=1e-12)
    assert got["recovered"] == pytest.approx((cos.max(1) > 0.9).mean())
    assert got["matching_score"] == pytest.approx(brute_force_assignment(cos) / 5, rel=1e-12)
    assert got["matching_solver"].startswith("scipy" if use_scipy else "sparse_sae")
    fewer = feature_recovery(W_dec[:3], dictionary)                              # fewer latents than features
    assert fewer["matching_score"] == pytest.approx(brute_force_assignment(cos[:, :3]) / 5, rel=1e-12)


# ------------------------------------------------------------------ robustness to k
def test_k_values():
    assert k_values(8, 100) == [2, 4, 8, 16, 32]
    assert k_values(3, 10) == [1, 3, 6, 10]
    assert k_values(1, 1) == [1]


@pytest.mark.parametrize("cls", [S.TopKSAE, S.BatchTopKSAE])
def test_forward_at_k_matches_reference(gen, cls):
    torch.manual_seed(0)
    sae = cls(11, 29, 5, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(29, generator=gen, dtype=torch.float64) * 0.3)
    if cls is S.BatchTopKSAE:
        sae.threshold.fill_(0.5)                     # a learned threshold that the k' rule must not use
    sae.train()
    x = torch.randn(13, 11, generator=gen, dtype=torch.float64)
    for kk in (1, 2, 10, 20, 29):
        out = forward_at_k(sae, x, kk)
        h = reference.encode_ref(x, sae.W_enc, sae.b_enc, sae.b_dec)
        if cls is S.TopKSAE:
            v, i = reference.topk_select_ref(h, kk)
        else:
            v, i = reference.batchtopk_select_ref(h, kk)
        want = reference.sparse_decode_ref(v, i, sae.W_dec, sae.b_dec)
        torch.testing.assert_close(out.recon, want)
    assert sae.k == 5 and sae.training and int(sae.tokens_since_fired.sum()) == 0


# ------------------------------------------------------------------ probing
def test_top_latents_per_class_matches_loop(gen):
    n, f, c = 40, 17, 3
    codes = torch.relu(torch.randn(n, f, generator=gen))
    labels = torch.randint(0, c, (n,), generator=gen)
    got = top_latents_per_class(codes, labels, c, 4)
    for cls in range(c):
        means = [float(codes[labels == cls, j].mean()) for j in range(f)]
        want = sorted(range(f), key=lambda j: (-means[j], j))[:4]
        assert got[cls].tolist() == want
    v, i = codes.topk(f, dim=1)
    sparse = SparseCodes(v, i, f)
    assert torch.equal(top_latents_per_class(sparse, labels, c, 4), got)
    cols = torch.tensor([0, 5, 16])
    torch.testing.assert_close(sparse.columns(cols), codes[:, cols].double())


def newton_logistic(x, y, n_classes, l2, iters=60):
    """Multinomial logistic regression by Newton's method in numpy (bias unpenalised)."""
    x = np.hstack([x, np.ones((x.shape[0], 1))])
    n, d = x.shape
    theta = np.zeros(d * n_classes)
    onehot = np.eye(n_classes)[y]
    pen = np.ones(d)
    pen[-1] = 0
    pen = np.tile(pen, n_classes)              # theta is class-major: [class0 (d), class1 (d), ...]
    for _ in range(iters):
        t = theta.reshape(n_classes, d).T
        z = x @ t
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (x.T @ (p - onehot) / n).T.reshape(-1) + l2 * pen * theta
        hess = np.zeros((d * n_classes, d * n_classes))
        for a in range(n_classes):
            for b in range(n_classes):
                wgt = p[:, a] * ((a == b) - p[:, b])
                hess[a * d:(a + 1) * d, b * d:(b + 1) * d] = (x.T * wgt) @ x / n
        hess += np.diag(l2 * pen) + 1e-12 * np.eye(d * n_classes)
        theta -= np.linalg.lstsq(hess, grad, rcond=None)[0]
    t = theta.reshape(n_classes, d).T
    return t[:-1], t[-1]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_fit_logistic_matches_newton(gen, n_classes):
    x = torch.randn(70, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, n_classes, (70,), generator=gen)
    W, b = fit_logistic(x, y, n_classes, l2=0.05)
    Wn, bn = newton_logistic(x.numpy(), y.numpy(), n_classes, 0.05)
    # the softmax is invariant to a shift shared by all classes' biases: compare logits' differences
    logits, logits_n = (x @ W + b).numpy(), x.numpy() @ Wn + bn
    np.testing.assert_allclose(logits - logits[:, :1], logits_n - logits_n[:, :1], atol=1e-5)


def test_probe_finds_the_label_latent(gen):
    n, f = 300, 23
    labels = torch.randint(0, 3, (n,), generator=gen)
    codes = torch.relu(torch.randn(n, f, generator=gen)) * 0.2
    for c, j in enumerate((4, 11, 19)):
        codes[labels == c, j] += 2.0                 # one latent per class carries the label
    out = probe(codes, labels, budgets=(1, 2, 30))
    assert [b["m"] for b in out["budgets"]] == [1, 2, 30]
    assert out["budgets"][0]["features"] == 3 and out["budgets"][2]["features"] == f
    assert out["budgets"][0]["accuracy"] > 0.95 and out["budgets"][0]["balanced_accuracy_ovr"] > 0.95
    v, i = codes.topk(f, dim=1)
    sparse = probe(SparseCodes(v, i, f), labels, budgets=(1, 2, 30))
    for a, b in zip(out["budgets"], sparse["budgets"]):
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["features"] == b["features"]
    with pytest.raises(ValueError, match="two classes"):
        probe(codes, torch.zeros(n, dtype=torch.long))
    with pytest.raises(TypeError):
        probe(codes, labels.double())


# ------------------------------------------------------------------ the driver, the report and the CLI
D, F, K, N = 12, 40, 4, 230


@pytest.fixture
def saved_run(tmp_path, gen):
    from sparse_sae.eval.synthetic import make_synthetic
    data = make_synthetic(n_features=30, d=D, mean_active=3.0, seed=1)
    x = data.sample(N, gen)
    np.save(tmp_path / "acts.npy", x.numpy())
    np.save(tmp_path / "emb.npy", torch.randn(N, 6, generator=gen).numpy())
    np.save(tmp_path / "labels.npy", torch.randint(0, 3, (N,), generator=gen).numpy())
    np.save(tmp_path / "dict.npy", data.dictionary.numpy())
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "acts.npy"), "--n-latents", str(F), "--k", str(K),
                 "--batch-size", "32", "--steps", "6", "--warmup-steps", "1", "--l1-l2-ratio", "0.01",
                 "--out-dir", str(run), "--no-progress"]) == 0
    return tmp_path, run, x, data


def test_evaluate_matches_direct(saved_run):
    tmp, run, x, data = saved_run
    sae = S.load(run / "final")
    emb = torch.from_numpy(np.load(tmp / "emb.npy"))
    rep = evaluate(sae, tmp / "acts.npy", embeddings=emb, labels=tmp / "labels.npy", dictionary=data.dictionary,
                   batch_size=70)
    with torch.no_grad():
        sae.eval()
        out = sae(x)
    assert rep["reconstruction"]["fvu"] == pytest.approx(float(reference.fvu_ref(x.double(), out.recon.double())),
                                                         rel=1e-5)
    assert rep["reconstruction"]["l0"] == pytest.approx(float((out.values > 0).sum(1).double().mean()))
    dense = sae.dense_code(out.values, out.indices)
    torch.testing.assert_close(torch.from_numpy(rep["_arrays"]["monosemanticity"]), monosemanticity(dense, emb),
                               equal_nan=True, rtol=1e-6, atol=1e-9)
    curve = {r["k"]: r["fvu"] for r in rep["k_robustness"]["curve"]}
    assert sorted(curve) == [1, 2, 4, 8, 16] and curve[K] == pytest.approx(rep["reconstruction"]["fvu"], rel=1e-6)
    assert rep["recovery"] == feature_recovery(sae.W_dec, data.dictionary)
    assert [b["m"] for b in rep["probing"]["budgets"]] == [1, 2, 4, 8, 16]
    out_dir = write_report(rep, tmp / "ev")
    loaded = json.loads((out_dir / "report.json").read_text())
    assert loaded["reconstruction"]["fvu"] == pytest.approx(rep["reconstruction"]["fvu"])


def test_cli_eval_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0 and "--embeddings" in capsys.readouterr().out


def test_cli_eval_end_to_end(saved_run, capsys):
    tmp, run, _, _ = saved_run
    out = tmp / "report"
    assert main(["eval", str(run), str(tmp / "acts.npy"), "--out-dir", str(out), "--embeddings", str(tmp / "emb.npy"),
                 "--labels", str(tmp / "labels.npy"), "--dictionary", str(tmp / "dict.npy"), "--batch-size", "64",
                 "--device", "cpu"]) == 0
    assert "report written" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    assert rep["sae"]["path"].endswith("final") and rep["sae"]["k"] == K
    for key in ("reconstruction", "k_robustness", "monosemanticity", "probing", "recovery"):
        assert key in rep
    assert "| FVU |" in (out / "report.md").read_text()
    assert (out / "monosemanticity.npy").is_file() and (out / "firing_frequency.npy").is_file()
    pytest.importorskip("matplotlib")
    for png in ("k_robustness.png", "ms_histogram.png", "density_histogram.png"):
        assert (out / png).stat().st_size > 0
    # a module saved with save(), a checkpoint directory, and bad input
    sae = S.load(run / "final")
    S.save(sae, tmp / "saved")
    assert main(["eval", str(tmp / "saved"), str(tmp / "acts.npy"), "--out-dir", str(tmp / "r2"), "--no-plots",
                 "--max-rows", "50"]) == 0
    assert json.loads((tmp / "r2" / "report.json").read_text())["data"]["rows"] == 50
    assert not (tmp / "r2" / "k_robustness.png").exists()
    ckpt = next((run / "checkpoints").glob("step_*"))
    assert main(["eval", str(ckpt), str(tmp / "acts.npy"), "--out-dir", str(tmp / "r3"), "--no-plots"]) == 0
    capsys.readouterr()
    np.save(tmp / "wide.npy", np.zeros((10, D + 1), dtype=np.float32))
    assert main(["eval", str(run), str(tmp / "wide.npy"), "--out-dir", str(tmp / "r4")]) == 1
    assert "width" in capsys.readouterr().err
    assert main(["eval", str(tmp / "nowhere"), str(tmp / "acts.npy"), "--out-dir", str(tmp / "r5")]) == 1


def test_relu_sae_has_no_k_curve(gen):
    sae = S.ReLUSAE(5, 9, dtype=torch.float32)
    rep = evaluate(sae, torch.randn(20, 5, generator=gen))
    assert "skipped" in rep["k_robustness"] and rep["reconstruction"]["rows"] == 20
