"""``sparse-sae features``: from a trained SAE and its data to the static site.

One streaming pass (:func:`~sparse_sae.features.collect.collect`) with the SAE (and the second
run's, for the comparison view), then the context of the shown examples is re-encoded and the
pages are written (:mod:`sparse_sae.features.site`). Same data and settings, same site.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from sparse_sae.features import site
from sparse_sae.features.collect import collect
from sparse_sae.features.examples import fill_context, pick_examples
from sparse_sae.io.sidecar import read_sidecar
from sparse_sae.training.data import open_source

COMPARE_EXAMPLES = 3


def sample_latents(n_latents: int, n: int | None, seed: int = 0) -> torch.Tensor:
    """``n`` latents drawn without replacement (all when ``n`` is None or covers them), ascending;
    the same ``(n_latents, n, seed)`` always gives the same sample."""
    if n is None or n >= n_latents:
        return torch.arange(n_latents)
    if n < 1:
        raise ValueError(f"--latents must be positive, got {n}")
    return torch.randperm(n_latents, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def match_latents(W_a: torch.Tensor, W_b: torch.Tensor, latents_a: torch.Tensor, chunk: int = 1024) -> tuple:
    """For each of ``latents_a``: the latent of the other SAE with the closest decoder direction
    (cosine; ties to the lower index) and that cosine."""
    if W_a.shape[1] != W_b.shape[1]:
        raise ValueError(f"the two runs have different input widths ({W_a.shape[1]} and {W_b.shape[1]}); "
                         f"compare runs trained on the same data")
    A = W_a.detach().float().cpu()
    B = W_b.detach().float().cpu()
    A, B = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12), B / B.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best, cos = [], []
    for a in range(0, latents_a.numel(), chunk):
        c = A[latents_a[a:a + chunk]] @ B.T
        i = torch.sort(c, dim=1, descending=True, stable=True).indices[:, 0]
        best.append(i)
        cos.append(c.gather(1, i[:, None])[:, 0])
    return torch.cat(best), torch.cat(cos)


def _load(run_dir, device):
    from sparse_sae.saes import load
    from sparse_sae.training.checkpoint import resolve_sae_path

    return load(resolve_sae_path(run_dir), device=device)


def _pages(sae, stats, source, sidecar, batch_size) -> dict:
    pages = {slot: pick_examples(stats, slot) for slot in range(stats.latents.numel())}
    fill_context(sae, stats, pages, source, sidecar, batch_size)
    return pages


def compare_page(stats_a, pages_a, stats_b, pages_b, best, cos, sidecar, thumbs, info) -> str:
    slot_b = {lat: s for s, lat in enumerate(stats_b.latents.tolist())}
    rows = []
    for slot, latent in enumerate(stats_a.latents.tolist()):
        b = int(best[slot])
        sb = slot_b[b]
        top_a, top_b = pages_a[slot][0], pages_b[sb][0]
        cell_a = site.examples_block(top_a[:COMPARE_EXAMPLES], sidecar, top_a[0].value if top_a else 0, thumbs, "")
        cell_b = site.examples_block(top_b[:COMPARE_EXAMPLES], sidecar, top_b[0].value if top_b else 0,
                                     thumbs, "")
        dead = int(stats_a.count[slot] == 0 and stats_b.count[sb] == 0)
        rows.append(f'<tr data-dead="{dead}"><td class="num" data-v="{latent}"><a href="latents/{latent}.html">'
                    f'{latent}</a><br><span class="val">{site.fmt(float(stats_a.density[slot]))}</span></td>'
                    f'<td class="num" data-v="{float(cos[slot]):.6g}">{float(cos[slot]):.3f}</td>'
                    f'<td class="num" data-v="{b}"><a href="b/latents/{b}.html">{b}</a><br>'
                    f'<span class="val">{site.fmt(float(stats_b.density[sb]))}</span></td>'
                    f'<td>{cell_a}</td><td>{cell_b}</td></tr>')
    body = (f'<p><a href="index.html">← {site.esc(info["name_a"])}</a> · <a href="b/index.html">'
            f'{site.esc(info["name_b"])} →</a></p>\n<h1>{site.esc(info["name_a"])} vs {site.esc(info["name_b"])}</h1>\n'
            f'<p class="meta">Each latent of the first run beside the latent of the second whose decoder direction is '
            f'closest (cosine); density under each number; top {COMPARE_EXAMPLES} examples of each.</p>\n'
            f'<p><input id="filter" type="search" placeholder="filter" size="30"> <label><input id="hide-dead" '
            f'type="checkbox"> hide pairs that never fired</label> · <span id="shown">{len(rows)}</span> of '
            f'{len(rows)} shown</p>\n<table id="latents">\n<thead><tr><th data-sort="1">{site.esc(info["name_a"])}</th>'
            f'<th data-sort="1">cosine</th><th data-sort="1">{site.esc(info["name_b"])}</th>'
            f'<th>top examples (first)</th><th>top examples (second)</th></tr></thead>\n<tbody>\n' + "\n".join(rows)
            + "\n</tbody>\n</table>")
    return site.page(f"{info['name_a']} vs {info['name_b']}", body, "style.css", site.INDEX_JS)


def build_features(run_dir, data_dir, out_dir, *, latents: int | None = None, examples: int = 20,
                   embeddings=None, compare=None, batch_size: int = 4096, seed: int = 0, device: str = "cpu",
                   progress: bool = True) -> dict:
    """Writes the feature browser for the SAE of ``run_dir`` on ``data_dir`` to ``out_dir``
    (and, with ``compare``, the second run's pages under ``out_dir/b`` and ``compare.html``).
    Returns a summary: rows, latents, pass seconds, the sidecar's kind (or why there is none)."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"--examples must be a positive int, got {examples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive int, got {batch_size!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    sae = _load(run_dir, device)
    source = open_source(data_dir)
    emb = open_source(embeddings) if embeddings is not None else None
    sidecar, reason = read_sidecar(data_dir, source.n_rows)
    chosen = sample_latents(sae.n_latents, latents, seed)
    saes, sets = [sae], [chosen]
    if compare is not None:
        sae_b = _load(compare, device)
        best, cos = match_latents(sae.W_dec, sae_b.W_dec, chosen)
        saes.append(sae_b)
        sets.append(torch.unique(best))
    n_sample = max(8, 2 * examples)
    t0 = time.perf_counter()
    all_stats = collect(saes, sets, source, n_top=examples, n_sample=n_sample, batch_size=batch_size, seed=seed,
                        embeddings=emb, progress=progress)
    pass_s = time.perf_counter() - t0
    subtitle = (f"{source.n_rows} rows of width {source.d} from {data_dir}"
                + (f" ({sidecar.kind} examples)" if sidecar is not None else "")
                + f"; {chosen.numel()} of {sae.n_latents} latents shown"
                + (f" (random sample, seed {seed})" if chosen.numel() < sae.n_latents else ""))
    name_a = Path(str(run_dir)).name or str(run_dir)
    info = {"title": f"{name_a}: {type(sae).__name__} {sae.d_in} → {sae.n_latents}", "subtitle": subtitle,
            "compare": compare is not None}
    pages_a = _pages(sae, all_stats[0], source, sidecar, batch_size)
    site.write_site(out, sae, all_stats[0], pages_a, sidecar, reason, info)
    if compare is not None:
        name_b = Path(str(compare)).name or str(compare)
        info_b = {"title": f"{name_b}: {type(sae_b).__name__} {sae_b.d_in} → {sae_b.n_latents}",
                  "subtitle": subtitle.split(";")[0] + f"; the latents matched to {name_a}'s", "compare": False}
        pages_b = _pages(sae_b, all_stats[1], source, sidecar, batch_size)
        site.write_site(out / "b", sae_b, all_stats[1], pages_b, sidecar, reason, info_b)
        thumbs = site.write_thumbs(sidecar, _images_of(sidecar, pages_a, pages_b), out)
        (out / "compare.html").write_text(compare_page(all_stats[0], pages_a, all_stats[1], pages_b, best, cos,
                                                       sidecar, thumbs, {"name_a": name_a, "name_b": name_b}))
    return {"rows": source.n_rows, "latents": int(chosen.numel()), "pass_s": pass_s, "out": str(out),
            "sidecar": sidecar.kind if sidecar is not None else None, "reason": reason}


def _images_of(sidecar, *page_sets) -> set:
    if sidecar is None or sidecar.kind != "image":
        return set()
    col = sidecar.column("image")
    return {int(col[e.row]) for pages in page_sets for top, rnd in pages.values() for e in top + rnd}
