"""The feature browser: streaming top-N against brute force, the extraction sidecar, sites built
from tiny random text and vision models, HTML validity and escaping, bounded memory, and the
pages in a real headless browser when one is installed."""
import html.parser
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from sparse_sae.data import TensorSource
from sparse_sae.features.build import build_features, match_latents, sample_latents
from sparse_sae.features.collect import HIST_BINS, FeatureCollector, collect, hist_bin
from sparse_sae.features.sidecar import SIDECAR_JSON, read_sidecar
from sparse_sae.features.topn import StreamingTopN, sample_scores
from sparse_sae.modules import TopKSAE

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
        entries = sorted(((-float(col[r]), r) for r in range(rows) if col[r] > 0))[:n]
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


def test_topn_memory_is_bounded_by_latents_times_n(gen):
    """More rows than the top-N table holds: the state does not grow with the rows streamed."""
    n_latents, k, n = 64, 4, 5
    sae = TopKSAE(16, n_latents, k)
    sizes = []
    for rows in (300, 6000):                    # 6000 * k entries >> 64 latents * 5 kept each
        col = FeatureCollector(n_latents, torch.arange(n_latents), n, 2 * n)
        x = torch.randn(rows, 16, generator=gen)
        for a in range(0, rows, 256):
            with torch.no_grad():
                out = sae(x[a:a + 256])
            col.update(out.values, out.indices)
        sizes.append(col.nbytes())
        assert col.n_rows == rows
    assert sizes[0] == sizes[1]
    assert sizes[1] < 6000 * k * 8        # less than the entries streamed would take


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
    from sparse_sae.extract import extract

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
