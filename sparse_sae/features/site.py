"""The static site: ``index.html`` (a sortable, filterable table of latents), one page per latent
under ``latents/``, ``style.css`` and image thumbnails under ``thumbs/``. Pages open from disk:
no server, no network, no fetch; the only script is the index's few lines of plain JavaScript.

Every string taken from the data (tokens, labels, paths) goes through :func:`html.escape`.
"""
from __future__ import annotations

import html
import math
from pathlib import Path

import torch

from sparse_sae.features.collect import HIST_BINS, LatentStats, hist_edges

SPARK_BINS = 32          # the sparkline and page histogram show 8 octaves below the maximum
N_NEAREST = 8

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
h1 { font-size: 1.35em; margin: 0 0 .3em; } h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
.meta { color: #555; } .notice { background: #fff4d6; border: 1px solid #e8c66a; padding: .5em .8em; }
table { border-collapse: collapse; } th, td { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; text-align: left; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; user-select: none; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ex { font: 13px/1.6 ui-monospace, monospace; white-space: pre-wrap; padding: 2px 0; }
.t { border-radius: 2px; } .t.max { outline: 2px solid #c00; }
.val { color: #777; font: 12px ui-monospace, monospace; margin-right: .6em; }
.thumb { position: relative; display: inline-block; margin: 0 6px 6px 0; }
.thumb img, .thumb svg { width: 128px; height: 128px; display: block; }
.thumb svg { position: absolute; left: 0; top: 0; }
.cap { font: 11px ui-monospace, monospace; color: #555; }
.grid { display: flex; flex-wrap: wrap; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
a { color: #0645ad; text-decoration: none; } a:hover { text-decoration: underline; }
"""

INDEX_JS = """
(function () {
  var table = document.getElementById('latents'), body = table.tBodies[0];
  var filter = document.getElementById('filter'), hideDead = document.getElementById('hide-dead');
  var shown = document.getElementById('shown');
  function apply() {
    var q = filter.value.toLowerCase(), n = 0;
    for (var i = 0; i < body.rows.length; i++) {
      var r = body.rows[i];
      var ok = r.textContent.toLowerCase().indexOf(q) >= 0 && !(hideDead.checked && r.dataset.dead === '1');
      r.style.display = ok ? '' : 'none'; if (ok) n++;
    }
    shown.textContent = n;
  }
  // index.html#q=TEXT opens with the filter set (a link to a filtered view)
  if (location.hash.indexOf('#q=') === 0) filter.value = decodeURIComponent(location.hash.slice(3));
  filter.addEventListener('input', apply); hideDead.addEventListener('change', apply);
  var heads = table.tHead.rows[0].cells;
  for (var c = 0; c < heads.length; c++) (function (col) {
    if (!heads[col].dataset.sort) return;
    heads[col].addEventListener('click', function () {
      var desc = heads[col].dataset.dir !== 'desc'; heads[col].dataset.dir = desc ? 'desc' : 'asc';
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = parseFloat(a.cells[col].dataset.v), y = parseFloat(b.cells[col].dataset.v);
        if (isNaN(x)) return 1; if (isNaN(y)) return -1;   // no score: last either way
        return desc ? y - x : x - y;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  })(c);
  apply();
  table.setAttribute('data-ready', '1');
})();
"""

esc = html.escape


def page(title: str, body: str, css_href: str, script: str = "") -> str:
    js = f"<script>{script}</script>\n" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f'<link rel="stylesheet" href="{esc(css_href)}">\n</head>\n<body>\n{body}\n{js}</body>\n</html>\n')


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3g}"


# ---------------------------------------------------------------------------------------- histograms
def hist_window(hist_row: torch.Tensor) -> tuple:
    """``(counts, lo_edge, hi_edge)`` of the :data:`SPARK_BINS` bins ending at the highest non-empty bin."""
    nz = torch.nonzero(hist_row).flatten()
    top = int(nz[-1]) + 1 if nz.numel() else HIST_BINS
    lo = max(0, top - SPARK_BINS)
    edges = hist_edges()
    counts = hist_row[lo:top].tolist()
    counts = [0] * (SPARK_BINS - len(counts)) + counts
    return counts, float(edges[max(0, top - SPARK_BINS)]), float(edges[top])


def hist_svg(hist_row: torch.Tensor, width: int, height: int, axis: bool = False) -> str:
    counts, lo, hi = hist_window(hist_row)
    if axis and not any(counts):
        return '<p class="meta">never fired</p>'
    peak = max(counts) or 1
    w = width / len(counts)
    bars = "".join(f'<rect x="{i * w:.1f}" y="{height - height * c / peak:.1f}" width="{max(w - 0.5, 0.5):.1f}" '
                   f'height="{height * c / peak:.1f}"/>' for i, c in enumerate(counts) if c)
    label = (f'<title>activation histogram, log scale from {lo:.3g} to {hi:.3g}</title>')
    svg = (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'fill="#4a7bd0">{label}{bars}</svg>')
    if axis:
        svg += f'<div class="cap">{lo:.3g} … {hi:.3g} (log scale; firings shown: {sum(counts)})</div>'
    return svg


# ---------------------------------------------------------------------------------------- examples
def _shade(act: float, peak: float) -> str:
    a = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    return f"background: rgba(255, 120, 0, {a * 0.85:.2f})"


def _token_text(sidecar, row: int) -> str:
    tok = str(int(sidecar.column("token")[row]))
    return sidecar.meta["tokens"].get(tok, f"<{tok}>").replace("\n", "\u21b5")


def text_example(ex, sidecar, peak: float, band: str = "") -> str:
    spans = []
    for row, act in ex.context:
        cls = "t max" if row == ex.row else "t"
        spans.append(f'<span class="{cls}" style="{_shade(act, peak)}" title="{act:.4g}">'
                     f'{esc(_token_text(sidecar, row))}</span>')
    doc = int(sidecar.column("doc")[ex.row])
    return (f'<div class="ex">{band}<span class="val" title="document {doc}, row {ex.row}">{ex.value:.3g}</span>'
            f'{"".join(spans)}</div>')


def image_example(ex, sidecar, peak: float, thumbs: dict, prefix: str) -> str:
    image = int(sidecar.column("image")[ex.row])
    patch = int(sidecar.column("patch")[ex.row])
    name = sidecar.meta["images"][image]
    src = thumbs.get(image)
    img = f'<img src="{esc(prefix + src)}" alt="{esc(name)}">' if src else \
        '<svg viewBox="0 0 1 1"><text x="0" y="0.5" font-size="0.08">image not found</text></svg>'
    grid, overlay = sidecar.meta.get("grid"), ""
    if grid:
        gh, gw = grid
        rects = []
        for row, act in ex.context:
            p = int(sidecar.column("patch")[row])
            if p < 0:
                continue
            y, x = divmod(p, gw)
            a = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
            stroke = ' stroke="#c00" stroke-width="0.08"' if row == ex.row else ""
            if a > 0 or stroke:
                rects.append(f'<rect x="{x}" y="{y}" width="1" height="1" fill="rgb(255,90,0)" '
                             f'fill-opacity="{a * 0.75:.2f}"{stroke}/>')
        overlay = f'<svg viewBox="0 0 {gw} {gh}" preserveAspectRatio="none">{"".join(rects)}</svg>'
    where = ("CLS token" if patch < 0 else f"patch {patch}") + (f" [{ex.band}]" if ex.band else "")
    return (f'<div class="thumb">{img}{overlay}<div class="cap">{ex.value:.3g} · {esc(where)}<br>'
            f'{esc(Path(name).name)}</div></div>')


def example_html(ex, sidecar, peak: float, thumbs: dict, prefix: str) -> str:
    band = f'<span class="val">[{esc(ex.band)}]</span>' if ex.band else ""
    if sidecar is None:
        return f'<div class="ex">{band}<span class="val">{ex.value:.3g}</span>row {ex.row}</div>'
    if sidecar.kind == "text":
        return text_example(ex, sidecar, peak, band)
    if sidecar.kind == "image":
        return image_example(ex, sidecar, peak, thumbs, prefix)
    label = sidecar.meta["labels"][int(sidecar.column("label")[ex.row])]
    return f'<div class="ex">{band}<span class="val">{ex.value:.3g}</span>{esc(label)}</div>'


def examples_block(examples, sidecar, peak, thumbs, prefix) -> str:
    items = "".join(example_html(e, sidecar, peak, thumbs, prefix) for e in examples)
    if items and sidecar is not None and sidecar.kind == "image":
        return f'<div class="grid">{items}</div>'
    return items or '<p class="meta">none</p>'


def preview(ex, sidecar) -> str:
    """A short plain-text preview of an example, for the index."""
    if ex is None:
        return ""
    if sidecar is None:
        return f"row {ex.row}"
    if sidecar.kind == "text":
        near = [r for r, _ in ex.context if abs(r - ex.row) <= 4]
        return "".join(("[" + _token_text(sidecar, r) + "]") if r == ex.row else _token_text(sidecar, r) for r in near)
    if sidecar.kind == "image":
        return Path(sidecar.meta["images"][int(sidecar.column("image")[ex.row])]).name
    return sidecar.meta["labels"][int(sidecar.column("label")[ex.row])]


# ---------------------------------------------------------------------------------------- thumbnails
def model_view(size: tuple, meta: dict) -> tuple:
    """The box ``(left, top, right, bottom)`` of an image of ``size`` that the model saw, so that the
    patch grid lies over the right pixels: the processor's centre crop, or the whole image."""
    w, h = size
    if meta.get("crop") != "center":
        return (0, 0, w, h)
    edge, crop = meta.get("shortest_edge"), meta.get("crop_size")
    if edge and crop and all(crop):
        scale = edge / min(w, h)
        cw, ch = min(w, crop[1] / scale), min(h, crop[0] / scale)
    else:
        cw = ch = min(w, h)
    left, top = (w - cw) / 2, (h - ch) / 2
    return (round(left), round(top), round(left + cw), round(top + ch))


def write_thumbs(sidecar, images, out_dir: Path, size: int = 128) -> dict:
    """``image id -> path relative to the site`` for the images shown, fitted the way the model saw them."""
    if sidecar is None or sidecar.kind != "image" or not images:
        return {}
    from PIL import Image

    (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
    root, names, made = Path(sidecar.meta["root"]), sidecar.meta["images"], {}
    for i in sorted(images):
        try:
            with Image.open(root / names[i]) as im:
                im = im.convert("RGB")
                im = im.crop(model_view(im.size, sidecar.meta))
                im.resize((size, size), Image.BICUBIC).save(out_dir / "thumbs" / f"{i}.png")
                made[i] = f"thumbs/{i}.png"
        except OSError:
            continue             # shown as "image not found"
    return made


# ---------------------------------------------------------------------------------------- pages
def nearest_latents(W_dec: torch.Tensor, latents: torch.Tensor, n: int = N_NEAREST, chunk: int = 1024) -> list:
    """For each of ``latents``: ``[(latent, cosine)]``, the ``n`` others with the most similar decoder row."""
    W = W_dec.detach().float().cpu()
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = []
    for a in range(0, latents.numel(), chunk):
        ids = latents[a:a + chunk]
        cos = W[ids] @ W.T
        cos[torch.arange(ids.numel()), ids] = -math.inf
        k = min(n, W.shape[0] - 1)
        order = torch.sort(cos, dim=1, descending=True, stable=True).indices[:, :k]
        for i in range(ids.numel()):
            out.append([(int(j), float(cos[i, j])) for j in order[i]])
    return out


def latent_page(latent: int, slot: int, stats: LatentStats, top, randoms, nearest, sidecar, reason, thumbs,
                info: dict, has_page: set) -> str:
    peak = top[0].value if top else 0.0
    ms = f" · monosemanticity {fmt(float(stats.ms[slot]))}" if stats.ms is not None else ""
    near = ", ".join((f'<a href="{j}.html">{j}</a>' if j in has_page else str(j)) + f" ({c:.2f})"
                     for j, c in nearest)
    notice = f'<p class="notice">{esc(reason)}</p>' if reason else ""
    body = (f'<p><a href="../index.html">← all latents</a></p>\n'
            f'<h1>Latent {latent}</h1>\n'
            f'<p class="meta">{esc(info["title"])} · density {fmt(float(stats.density[slot]))} '
            f'({int(stats.count[slot])} of {stats.n_rows} rows) · mean activation {fmt(float(stats.mean[slot]))} · '
            f'max {fmt(peak)}{ms}</p>\n{notice}'
            f'<h2>Activation histogram</h2>\n{hist_svg(stats.hist[slot], 360, 80, axis=True)}\n'
            f'<h2>Nearest latents by decoder cosine</h2>\n<p id="nearest">{near or "–"}</p>\n'
            f'<h2>Top {len(top)} examples</h2>\n'
            f'<div id="top">{examples_block(top, sidecar, peak, thumbs, "../")}</div>\n'
            f'<h2>Random examples from lower quantiles</h2>\n'
            f'<div id="random">{examples_block(randoms, sidecar, peak, thumbs, "../")}</div>')
    return page(f"latent {latent} · {info['title']}", body, "../style.css")


def index_page(stats: LatentStats, firsts: dict, sidecar, reason: str, info: dict) -> str:
    has_ms = stats.ms is not None
    head = ('<tr><th data-sort="1">latent</th><th data-sort="1">density</th><th data-sort="1">mean act</th>'
            '<th data-sort="1">max act</th>' + ('<th data-sort="1">monosemanticity</th>' if has_ms else "") +
            '<th>histogram</th><th>top example</th></tr>')
    rows = []
    for slot, latent in enumerate(stats.latents.tolist()):
        count = int(stats.count[slot])
        top_v = float(stats.top.values[slot, 0]) if count else 0.0
        cells = [f'<td class="num" data-v="{latent}"><a href="latents/{latent}.html">{latent}</a></td>',
                 f'<td class="num" data-v="{float(stats.density[slot]):.6g}">{fmt(float(stats.density[slot]))}</td>',
                 f'<td class="num" data-v="{float(stats.mean[slot]):.6g}">{fmt(float(stats.mean[slot]))}</td>',
                 f'<td class="num" data-v="{top_v:.6g}">{fmt(top_v)}</td>']
        if has_ms:
            m = float(stats.ms[slot])
            cells.append(f'<td class="num" data-v="{"nan" if math.isnan(m) else f"{m:.6g}"}">{fmt(m)}</td>')
        cells.append(f'<td>{hist_svg(stats.hist[slot], 96, 18)}</td>')
        cells.append(f'<td class="ex">{esc(preview(firsts.get(slot), sidecar))}</td>')
        rows.append(f'<tr data-dead="{int(count == 0)}">{"".join(cells)}</tr>')
    notice = f'<p class="notice">{esc(reason)}</p>' if reason else ""
    body = (f'<h1>{esc(info["title"])}</h1>\n<p class="meta">{esc(info["subtitle"])}</p>\n{notice}'
            f'<p><input id="filter" type="search" placeholder="filter: latent number or example text" size="40"> '
            f'<label><input id="hide-dead" type="checkbox"> hide latents that never fired</label> · '
            f'<span id="shown">{len(rows)}</span> of {len(rows)} shown · click a column to sort'
            + (' · <a href="compare.html">compare with the other run</a>' if info.get("compare") else "") +
            f'</p>\n<table id="latents">\n<thead>{head}</thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody>\n</table>")
    return page(info["title"], body, "style.css", INDEX_JS)


def write_site(out_dir, sae, stats: LatentStats, pages: dict, sidecar, reason: str, info: dict) -> Path:
    """Writes index, latent pages, style and thumbnails for one SAE; ``pages``: ``slot -> (top, random)``
    with their context filled in."""
    out = Path(out_dir)
    (out / "latents").mkdir(parents=True, exist_ok=True)
    for old in [*(out / "latents").glob("*.html"), *(out / "thumbs").glob("*.png")]:
        if old.stem.isdigit():          # pages of an earlier build: they would link to stale data
            old.unlink()
    (out / "style.css").write_text(CSS)
    images = set()
    if sidecar is not None and sidecar.kind == "image":
        col = sidecar.column("image")
        images = {int(col[e.row]) for top, rnd in pages.values() for e in top + rnd}
    thumbs = write_thumbs(sidecar, images, out)
    nearest = nearest_latents(sae.W_dec, stats.latents)
    has_page = set(stats.latents.tolist())
    firsts = {}
    for slot, latent in enumerate(stats.latents.tolist()):
        top, randoms = pages[slot]
        firsts[slot] = top[0] if top else None
        (out / "latents" / f"{latent}.html").write_text(
            latent_page(latent, slot, stats, top, randoms, nearest[slot], sidecar, reason, thumbs, info, has_page))
    (out / "index.html").write_text(index_page(stats, firsts, sidecar, reason, info))
    return out
