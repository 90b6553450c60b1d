"""The feature browser: streaming top-N against brute force, the extraction sidecar, sites built
from tiny random text and vision models, HTML validity and escaping, bounded memory, and the
pages in a real headless browser when one is installed."""
import html.parser
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from sparse_sae.features.build import build_features, match_latents, sample_latents
from sparse_sae.features.collect import HIST_BINS, FeatureCollector, collect, hist_bin
from sparse_sae.features.topn import sample_scores
from sparse_sae.io.sidecar import SIDECAR_JSON, read_sidecar
from sparse_sae.saes import TopKSAE
from sparse_sae.training.data import ActivationSource, TensorSource

HIDDEN = 32


# ---------------------------------------------------------------------------------------- helpers
class _Checker(html.parser.HTMLParser):
    """Parses a page and checks that every element that must close is closed in order; collects
    text per element id and the script bodies."""
    VOID = {"meta", "link", "br", "img", "input", "rect", "hr", "path"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.ids, self.scripts, self.text = [], [], {}, [], []
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if dict(attrs).get("id"):
            self.ids[dict(attrs)["id"]] = len(self.text)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)
        else:
            self.text.append(data)


def parse_page(path):
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    c = _Checker()
    c.feed(text)
    c.close()
    assert not c.errors and not c.stack, f"{path}: {c.errors} open: {c.stack}"
    return c


def brute_top(values, indices, latents, n):
    """Per latent: the n largest (value, row) with ties to the earlier row, from the dense code."""
    rows = values.shape[0]
    dense = torch.zeros(rows, int(indices.max()) + 1 if indices.numel() else 1)
    dense.scatter_(1, indices, values)
    out = {}
    for lat in latents:
        col = dense[:, lat] if lat < dense.shape[1] else torch.zeros(rows)
        fired = torch.nonzero(col > 0).flatten().tolist()
        entries = sorted((-v, r) for r, v in zip(fired, col[fired].tolist()))[:n]
        out[lat] = [(r, -v) for v, r in entries]
    return out


def _code(gen, rows, n_latents, k, ties=False):
    scores = torch.rand(rows, n_latents, generator=gen)
    if ties:
        scores = (scores * 4).floor() / 4 + 0.25      # few distinct values: many ties
    values, indices = scores.topk(k, dim=1)
    values[torch.rand(rows, k, generator=gen) < 0.2] = 0.0   # selected but carrying nothing
    return values, indices


# ---------------------------------------------------------------------------------------- streaming top-N
@pytest.mark.parametrize("ties", [False, True])
def test_streaming_topn_equals_brute_force(gen, ties):
    rows, n_latents, k, n = 203, 37, 5, 7
    values, indices = _code(gen, rows, n_latents, k, ties)
    latents = torch.tensor([0, 3, 4, 17, 36])
    want = brute_top(values, indices, latents.tolist(), n)
    for batch in (1, 16, 64, rows):          # the result cannot depend on the batch size
        col = FeatureCollector(n_latents, latents, n, 4)
        for a in range(0, rows, batch):
            col.update(values[a:a + batch], indices[a:a + batch])
        stats = col.result()
        for slot, lat in enumerate(latents.tolist()):
            got = [(int(r), float(v)) for r, v in zip(stats.top.rows[slot], stats.top.values[slot]) if r >= 0]
            assert got == want[lat], (batch, lat)
            fired = (values * (indices == lat)).sum(1)
            assert int(stats.count[slot]) == int((fired > 0).sum())
            assert float(stats.total[slot]) == pytest.approx(float(fired.double().sum()))
            bins = torch.bincount(hist_bin(fired[fired > 0]), minlength=HIST_BINS)
            assert torch.equal(stats.hist[slot], bins)


def test_random_sample_is_uniform_and_batch_independent(gen):
    """The hash reservoir is the brute-force "smallest hash" sample, and the hash spreads evenly."""
    rows, n = 500, 10
    values = torch.rand(rows, 1, generator=gen) + 0.1
    indices = torch.zeros(rows, 1, dtype=torch.int64)
    samples = []
    for batch in (7, 500):
        col = FeatureCollector(1, torch.tensor([0]), 3, n, seed=5)
        for a in range(0, rows, batch):
            col.update(values[a:a + batch], indices[a:a + batch])
        samples.append(col.result().sample.rows[0].tolist())
    keys = sample_scores(torch.arange(rows), torch.zeros(rows, dtype=torch.int64), seed=5)
    want = torch.sort(keys, descending=True, stable=True).indices[:n].tolist()
    assert samples[0] == samples[1] == want
    # the 63-bit hash of consecutive rows falls evenly in 4 bins
    h = -sample_scores(torch.arange(4000), torch.full((4000,), 3), seed=1)
    counts = torch.bincount((h >> 61).long(), minlength=4)
    assert counts.min() > 850, counts


class _GeneratedRows(ActivationSource):
    """Rows made on demand from their index: a data set never held in memory."""

    def __init__(self, n_rows, d):
        self.n_rows, self.d = n_rows, d

    def rows(self, start, stop):
        return torch.randn(stop - start, self.d, generator=torch.Generator().manual_seed(start))


def test_pass_memory_is_bounded_by_latents_times_n():
    """Many more rows than the top-N tables hold: the pass's state does not grow with the rows, and
    what it keeps is still the brute-force top-N."""
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4).eval()
    sizes = {}
    for rows in (1024, 20480):                  # 20480 rows * k=4 entries >> 64 latents * 5 kept
        stats = collect([sae], [torch.arange(64)], _GeneratedRows(rows, 16), n_top=5, n_sample=10,
                        batch_size=1024, progress=False)[0]
        sizes[rows] = stats.top.nbytes() + stats.sample.nbytes() + stats.hist.numel() * 8
    assert sizes[1024] == sizes[20480] == 64 * (5 * 16 + 10 * 20 + 128 * 8)
    with torch.no_grad():
        x = _GeneratedRows(20480, 16)
        out = [sae(x.rows(a, a + 1024)) for a in range(0, 20480, 1024)]
    values, indices = torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])
    want = brute_top(values, indices, [0, 31, 63], 5)
    for lat in (0, 31, 63):
        assert [(int(r), float(v)) for r, v in zip(stats.top.rows[lat], stats.top.values[lat])] == want[lat]


# ---------------------------------------------------------------------------------------- end to end
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

DOCS = ["the cat sat on a mat and the dog ran far",
        "a dog sat on the cat <script> alert(1) </script> & more",
        "far far away the mat ran",
        "cat cat cat dog dog & < > mat"]


def _text_model(tmp_path):
    words = sorted({w for d in DOCS for w in d.split()})
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), hidden_size=HIDDEN,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           intermediate_size=64, max_position_embeddings=64))
    path = tmp_path / "minilm"       # a MiniLM-shaped (BERT) encoder, random weights
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _sae_dir(tmp_path, name, d, n_latents=24, k=3, seed=0):
    torch.manual_seed(seed)
    sae = TopKSAE(d, n_latents, k)
    sae.save(tmp_path / name / "final")
    return tmp_path / name


@pytest.fixture(scope="module")
def text_site(tmp_path_factory):
    from sparse_sae.io.extract import extract

    tmp = tmp_path_factory.mktemp("text")
    model = _text_model(tmp)
    (tmp / "docs.txt").write_text("\n".join(DOCS) + "\n")
    meta = extract(str(model), tmp / "docs.txt", tmp / "acts", 1, batch_size=3, shard_rows=10, progress=False)
    run_a, run_b = _sae_dir(tmp, "topk", HIDDEN), _sae_dir(tmp, "topk-l1", HIDDEN, n_latents=20, seed=1)
    summary = build_features(run_a, tmp / "acts", tmp / "site", examples=4, batch_size=7, compare=run_b,
                             progress=False)
    return tmp, meta, summary


def test_extract_writes_text_sidecar(text_site):
    tmp, meta, _ = text_site
    sidecar, reason = read_sidecar(tmp / "acts", meta["n_rows"])
    assert reason == "" and sidecar.kind == "text"
    words = [w for d in DOCS for w in d.split()]
    assert meta["n_rows"] == len(words)
    tokens = [sidecar.meta["tokens"][str(t)].strip() for t in sidecar.column("token")]
    assert tokens == words                  # row i of the shards is token i of the corpus
    docs = sidecar.column("doc").tolist()
    assert docs == [i for i, d in enumerate(DOCS) for _ in d.split()]
    assert sidecar.column("pos").tolist() == [p for d in DOCS for p in range(len(d.split()))]


def test_text_site_pages_and_escaping(text_site):
    tmp, meta, summary = text_site
    site = tmp / "site"
    index = parse_page(site / "index.html")
    rows = [a for t, a in index.tags if t == "tr" and "data-dead" in a]
    assert len(rows) == 24 == summary["latents"]
    assert len(index.scripts) == 1 and "fetch" not in index.scripts[0] and "XMLHttpRequest" not in index.scripts[0]
    for page in sorted((site / "latents").glob("*.html")):
        p = parse_page(page)
        assert not any(t == "script" for t, _ in p.tags), f"{page.name}: a <script> element from example text"
        assert {"top", "random", "nearest"} <= set(p.ids)
    # a latent that fired on the <script> token shows it as text
    shown = [p for p in (site / "latents").glob("*.html") if "&lt;script&gt;" in p.read_text()]
    assert shown, "no page shows the <script> token"
    assert "<script>" in "".join(parse_page(shown[0]).text)
    assert "<script>" not in shown[0].read_text()
    # the top example's max token is the row the pass recorded
    cmp_page = parse_page(site / "compare.html")
    assert len([a for t, a in cmp_page.tags if t == "tr" and "data-dead" in a]) == 24
    assert (site / "b" / "index.html").is_file()


def test_site_is_deterministic(text_site, tmp_path):
    tmp, _, _ = text_site
    build_features(tmp / "topk", tmp / "acts", tmp_path / "again", examples=4, batch_size=7,
                   compare=tmp / "topk-l1", progress=False)
    files = sorted(p.relative_to(tmp / "site") for p in (tmp / "site").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for f in files:
        assert (tmp / "site" / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f


def test_vision_site_has_thumbnails_and_patch_heatmaps(tmp_path):
    from test_extract import _images, _vision_model

    from sparse_sae.io.extract import extract

    model = _vision_model(tmp_path, "dinov2")
    images = _images(tmp_path / "images")
    extract(str(model), images, tmp_path / "acts", 1, tokens="all", batch_size=2, shard_rows=30, progress=False)
    sidecar, _ = read_sidecar(tmp_path / "acts", 5 * 17)
    assert sidecar.kind == "image" and sidecar.meta["grid"] == [4, 4] and len(sidecar.meta["images"]) == 5
    assert sidecar.column("image").tolist() == [i for i in range(5) for _ in range(17)]
    assert sidecar.column("patch").tolist() == [p for _ in range(5) for p in range(-1, 16)]   # CLS, then patches
    build_features(_sae_dir(tmp_path, "run", HIDDEN, n_latents=16, k=2), tmp_path / "acts", tmp_path / "site",
                   latents=6, examples=3, progress=False)
    pages = sorted((tmp_path / "site" / "latents").glob("*.html"))
    assert len(pages) == 6
    thumbs = list((tmp_path / "site" / "thumbs").glob("*.png"))
    assert thumbs
    with Image.open(thumbs[0]) as im:
        assert im.size == (128, 128)
    p = parse_page(pages[0])
    imgs = [a["src"] for t, a in p.tags if t == "img"]
    assert imgs and all((pages[0].parent / s).resolve().is_file() for s in imgs)
    svgs = [a for t, a in p.tags if t == "svg" and a.get("viewbox") == "0 0 4 4"]
    assert len(svgs) == len(imgs)                        # one patch heatmap over each thumbnail
    marked = [a for t, a in p.tags if t == "rect" and a.get("stroke") == "#c00"]
    assert len(marked) >= len([c for c in "".join(p.text).split("·") if "patch" in c])


Image = pytest.importorskip("PIL.Image")


def test_old_shard_directory_says_why_it_shows_rows(text_site, tmp_path):
    """A shard directory from before the sidecar still trains and browses; the pages say why there is no text."""
    tmp, meta, _ = text_site
    old = tmp_path / "old"
    shutil.copytree(tmp / "acts", old)
    (old / SIDECAR_JSON).unlink()
    from sparse_sae.cli import main

    assert main(["features", str(tmp / "topk"), str(old), "--out", str(tmp_path / "site"), "--latents", "5",
                 "--examples", "3", "--no-progress"]) == 0
    index = (tmp_path / "site" / "index.html").read_text()
    assert "has no examples.json" in index and "run `sparse-sae extract` again" in index
    page = parse_page(next((tmp_path / "site" / "latents").glob("*.html")))
    assert "has no examples.json" in "".join(page.text)
    # the same latents as a sample of 5 picks, whatever the run
    assert sorted(int(p.stem) for p in (tmp_path / "site" / "latents").glob("*.html")) == \
        sample_latents(24, 5, 0).tolist()
    # bad input: one line, status 1
    assert main(["features", str(tmp / "topk"), str(old), "--out", str(tmp_path / "x"), "--examples", "0",
                 "--no-progress"]) == 1
    with pytest.raises(ValueError, match="d_in=32"):
        build_features(tmp / "topk", TensorSource(torch.zeros(4, 8)), tmp_path / "y", progress=False)


def test_compare_matches_latents_by_decoder_cosine(gen):
    W_a = torch.randn(6, 8, generator=gen)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    W_b = torch.empty(6, 8)
    W_b[perm] = 2.0 * W_a + 0.01 * torch.randn(6, 8, generator=gen)     # run b: a's latents, shuffled and scaled
    best, cos = match_latents(W_a, W_b, torch.arange(6))
    assert best.tolist() == perm.tolist() and bool((cos > 0.99).all())


def _demo_site(tmp_path):
    """The demo's kind of data (bench/features_demo.py), small: rows labelled with their true
    features, true codes as embeddings."""
    import importlib.util
    from pathlib import Path

    from sparse_sae.eval.synthetic import make_synthetic

    spec = importlib.util.spec_from_file_location(
        "features_demo", Path(__file__).resolve().parents[1] / "bench" / "features_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    data = make_synthetic(n_features=48, d=16, mean_active=3, seed=0)
    demo.write_data(data, tmp_path, rows=600)
    run = _sae_dir(tmp_path, "run", 16, n_latents=32, k=3)
    build_features(run, tmp_path / "acts", tmp_path / "site", examples=5, embeddings=tmp_path / "embeddings.npy",
                   batch_size=256, progress=False)
    return tmp_path / "site"


def test_demo_data_site_shows_labels_and_monosemanticity(tmp_path):
    from sparse_sae.eval.monosemanticity import monosemanticity
    from sparse_sae.saes import load
    from sparse_sae.training.data import open_source

    site = _demo_site(tmp_path)
    index = parse_page(site / "index.html")
    ms_cells = {}
    for t, a in index.tags:
        if t == "tr" and "data-dead" in a:
            row = []
        elif t == "td" and "data-v" in a:
            row.append(a["data-v"])
            if len(row) == 5:                       # latent, density, mean, max, monosemanticity
                ms_cells[int(row[0])] = float(row[4])
    # the one-pass score equals the batch formula on the whole dense code
    sae = load(tmp_path / "run" / "final").eval()
    x = open_source(tmp_path / "acts").rows(0, 600)
    with torch.no_grad():
        out = sae(x)
    dense = torch.zeros(600, 32).scatter_(1, out.indices, out.values)
    want = monosemanticity(dense, torch.from_numpy(np.load(tmp_path / "embeddings.npy")))
    assert len(ms_cells) == 32 and sum(not np.isnan(v) for v in ms_cells.values()) > 10
    for latent, got in ms_cells.items():
        assert got == pytest.approx(float(want[latent]), rel=1e-4, abs=1e-6, nan_ok=True), latent
    page = parse_page(site / "latents" / "0.html")
    assert "×" in "".join(page.text)                       # labels like f12×1.03 from the sidecar
    sidecar, _ = read_sidecar(tmp_path / "acts", 600)
    assert sidecar.kind == "label" and len(sidecar.meta["labels"]) == 600


# ---------------------------------------------------------------------------------------- real browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path, url, *args):
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; "
                                             ".ci/run installs it when it runs as root with apt)")
def test_pages_load_in_headless_chromium(text_site, tmp_path):
    tmp, _, _ = text_site
    site = tmp / "site"
    dom = _chromium(tmp_path, (site / "index.html").as_uri() + "#q=%3Cscript%3E", "--dump-dom")
    page = _Checker()
    page.feed(dom)
    rows = [a for t, a in page.tags if t == "tr" and "data-dead" in a]
    table = next(a for t, a in page.tags if t == "table")
    assert table.get("data-ready") == "1", "the index's script did not run"
    assert len(rows) == 24
    visible = [a for a in rows if "display: none" not in a.get("style", "")]
    want = [line for line in (site / "index.html").read_text().splitlines()
            if line.startswith("<tr") and "&lt;script&gt;" in line]
    assert 0 < len(visible) == len(want)           # the filter from the link ran in the browser
    latent = sorted((site / "latents").glob("*.html"), key=lambda p: -p.stat().st_size)[0]
    dom = _chromium(tmp_path, latent.as_uri(), "--dump-dom")
    page = _Checker()
    page.feed(dom)
    assert not any(t == "script" for t, _ in page.tags)
    n_top = len(re.findall(r'<div class="ex">', dom.split('id="top"')[1].split('id="random"')[0]))
    assert 1 <= n_top <= 4
    shot = tmp_path / "latent.png"
    _chromium(tmp_path, latent.as_uri(), f"--screenshot={shot}", "--window-size=1000,700")
    with Image.open(shot) as im:
        assert im.size == (1000, 700)



def test_thumbnail_is_the_part_of_the_image_the_model_saw():
    from sparse_sae.features.site import model_view

    # CLIP-like: shortest edge to 224, centre 224 x 224: the centre square
    assert model_view((400, 300), {"crop": "center", "shortest_edge": 224, "crop_size": [224, 224]}) == \
        (50, 0, 350, 300)
    # DINOv2-like: shortest edge to 256, centre 224: 224/256 of the centre square
    assert model_view((256, 512), {"crop": "center", "shortest_edge": 256, "crop_size": [224, 224]}) == \
        (16, 144, 240, 368)
    assert model_view((640, 480), {"crop": "stretch"}) == (0, 0, 640, 480)     # SigLIP: resized whole


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; "
                                             ".ci/run installs it when it runs as root with apt)")
def test_demo_site_loads_in_headless_chromium(tmp_path):
    site = _demo_site(tmp_path / "demo")
    page = _Checker()
    page.feed(_chromium(tmp_path, (site / "index.html").as_uri(), "--dump-dom"))
    assert next(a for t, a in page.tags if t == "table").get("data-ready") == "1"
    assert len([a for t, a in page.tags if t == "tr" and "data-dead" in a]) == 32
    assert "monosemanticity" in "".join(page.text)
    fired = max((site / "latents").glob("*.html"), key=lambda p: p.read_text().count('<div class="ex">'))
    dom = _chromium(tmp_path, fired.as_uri(), "--dump-dom")
    top = dom.split('id="top"')[1].split('id="random"')[0]
    assert top.count('<div class="ex">') == 5      # --examples 5
    _chromium(tmp_path, fired.as_uri(), f"--screenshot={tmp_path / 'demo_latent.png'}", "--window-size=900,600")
    assert (tmp_path / "demo_latent.png").stat().st_size > 1000
