"""``synpref inspect --html REPORT.html``: one self-contained HTML page about a build.

No external assets: thumbnails are embedded as base64 PNG/JPEG ``data:`` URIs, histograms are inline
SVG, styles are inline. Sections: findings, counts, drops by reason, per-reward score distribution
(table + histogram), reward agreement (mean Kendall tau-b, coloured), and the first ``--samples``
prompts with their candidates in rank order (each reward's score, phi, rank, generator, seed).
Images are decoded with ``decode_image`` (pixel limit, no pickle); one that does not decode shows its
reason instead.
"""
from __future__ import annotations

import base64
import html
import io
import math
from typing import Sequence

import numpy as np

from synpref.jobs.inspect_output import InspectReport, reward_label
from synpref.transforms.imageio import ImageDecodeError, decode_image

THUMB = 160  # px, longest side


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _num(v) -> str:
    if v is None:
        return "&ndash;"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return _e(v)


def thumbnail_data_uri(data: bytes, size: int = THUMB) -> str:
    """A base64 ``data:`` URI of a thumbnail (PNG for small images, JPEG above 128x128 pixels)."""
    img = decode_image(data)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    if img.width * img.height <= 128 * 128:
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        img.save(buf, format="JPEG", quality=80)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _table(df, classes: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_num(v)}</td>" if isinstance(v, (int, float)) or v is None
                                    else f'<td class="txt">{_num(v)}</td>' for v in row) + "</tr>"
                   for row in df.iter_rows())
    return f'<table class="{classes}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def histogram_svg(values: np.ndarray, bins: int = 20, width: int = 320, height: int = 120, kept=None,
                  marks: Sequence[tuple[float, str]] = (), value_range: tuple[float, float] | None = None) -> str:
    """Inline SVG bar histogram with min / max labels and a count per bar as a tooltip.

    ``kept``: a boolean mask over ``values``; the kept part of each bar is drawn darker over the whole.
    ``marks``: ``(score, label)`` vertical lines (a filter's thresholds and top-fraction cutoff).
    ``value_range``: (lo, hi) the x axis covers at least, so histograms side by side share one scale.
    """
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    kept_values = values[finite & np.asarray(kept, dtype=bool)] if kept is not None else None
    values = values[finite]
    if values.size == 0:
        return '<p class="muted">no scores</p>'
    marks = [(float(v), label) for v, label in marks if math.isfinite(v)]
    lo = min([float(values.min())] + [v for v, _ in marks])
    hi = max([float(values.max())] + [v for v, _ in marks])
    if value_range is not None:
        lo, hi = min(lo, float(value_range[0])), max(hi, float(value_range[1]))
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    kept_counts = np.histogram(kept_values, bins=bins, range=(lo, hi))[0] if kept_values is not None else None
    pad_b, pad_t = 18, 14 if marks else 4
    plot_h = height - pad_b - pad_t
    bw = width / bins
    top = max(int(counts.max()), 1)
    bars = []
    for i, c in enumerate(counts):
        h = plot_h * c / top
        tip = f"[{edges[i]:.4g}, {edges[i + 1]:.4g}): {c}" + (f", {kept_counts[i]} kept" if kept_counts is not None
                                                               else "")
        fill = "#b9cbe0" if kept_counts is not None else "#4c78a8"
        bars.append(f'<rect x="{i * bw + 1:.1f}" y="{pad_t + plot_h - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                    f'fill="{fill}"><title>{tip}</title></rect>')
        if kept_counts is not None and kept_counts[i]:
            hk = plot_h * kept_counts[i] / top
            bars.append(f'<rect class="kept" x="{i * bw + 1:.1f}" y="{pad_t + plot_h - hk:.1f}" width="{bw - 2:.1f}" '
                        f'height="{hk:.1f}" fill="#4c78a8"><title>{tip}</title></rect>')
    for v, label in marks:
        x = (v - lo) / (hi - lo) * width
        anchor = "end" if x > width / 2 else "start"
        bars.append(f'<line class="cutoff" data-value="{v:.6g}" x1="{x:.1f}" y1="{pad_t - 2}" x2="{x:.1f}" '
                    f'y2="{pad_t + plot_h}" stroke="#d62728" stroke-width="2" stroke-dasharray="4,2"/>'
                    f'<text x="{x + (-3 if anchor == "end" else 3):.1f}" y="{pad_t - 4}" font-size="11" fill="#d62728" '
                    f'text-anchor="{anchor}">{html.escape(label)} ({v:.4g})</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">'
            f'<line x1="0" y1="{pad_t + plot_h}" x2="{width}" y2="{pad_t + plot_h}" stroke="#888"/>'
            + "".join(bars)
            + f'<text x="0" y="{height - 4}" font-size="11">{lo:.4g}</text>'
            f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{hi:.4g}</text>'
            f'<text x="{width / 2}" y="{height - 4}" font-size="11" text-anchor="middle">max bin {top}</text></svg>')


def tau_colour(tau: float) -> str:
    """Diverging colour: -1 red, 0 white, +1 blue; grey for no value."""
    if tau is None or not math.isfinite(tau):
        return "#dddddd"
    t = max(-1.0, min(1.0, tau))
    target = (49, 104, 176) if t > 0 else (200, 60, 50)
    a = abs(t)
    r, g, b = (round(255 + (c - 255) * a) for c in target)
    return f"#{r:02x}{g:02x}{b:02x}"


def _agreement_table(rep: InspectReport, unit: str = "prompt groups") -> str:
    rewards = rep.rewards
    head = "<th></th>" + "".join(f"<th>{_e(r)}</th>" for r in rewards)
    rows = []
    for i, (row, groups) in enumerate(zip(rep.agreement.iter_rows(), rep.agreement_groups.iter_rows())):
        cells = []
        for j, r in enumerate(rewards):
            tau, n = row[j + 1], groups[j + 1]
            fg = "#fff" if tau is not None and math.isfinite(tau) and abs(tau) > 0.6 else "#000"
            cells.append(f'<td class="tau" data-a="{_e(rewards[i])}" data-b="{_e(r)}" data-tau="{_num(tau)}" '
                         f'style="background:{tau_colour(tau)};color:{fg}" title="over {n} {unit}">'
                         f'{_num(tau)}</td>')
        rows.append(f"<tr><th>{_e(row[0])}</th>{''.join(cells)}</tr>")
    return f'<table class="agreement"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _sample_html(sample: dict, rewards: list[str]) -> tuple[str, int]:
    meta = sample["json"]
    cards, n_images = [], 0
    for c in sorted(meta["candidates"], key=lambda c: c["rank"]):
        data = sample["images"].get(c.get("image", ""))
        if data is None:
            pic = '<div class="noimg">image missing</div>'
        else:
            try:
                pic = f'<img class="thumb" alt="rank {_e(c["rank"])}" src="{thumbnail_data_uri(data)}">'
                n_images += 1
            except ImageDecodeError as exn:
                pic = f'<div class="noimg">{_e(exn.reason)}</div>'
        lineage = c.get("lineage", {})
        scores = "".join(f"<tr><td>{_e(r)}</td><td>{_num(c['scores'].get(r))}</td></tr>" for r in rewards)
        cards.append(f'<div class="cand">{pic}<div class="lab"><b>rank {_e(c["rank"])}</b> &middot; '
                     f'phi {_num(float(c["phi"]))}<br><span class="muted">{_e(lineage.get("generator_id", ""))} '
                     f'seed {_e(lineage.get("seed", ""))}</span></div><table class="scores">{scores}</table></div>')
    head = (f'<h3 class="prompt">{_e(meta["prompt"])}</h3><p class="muted">[{_e(meta.get("category", ""))}] '
            f'prompt_id {_e(meta.get("prompt_id", sample.get("key", "")))}</p>')
    return f'<section class="sample">{head}<div class="cands">{"".join(cards)}</div></section>', n_images


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:20px;color:#222;max-width:1150px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:10px 0 2px} .muted{color:#777;font-size:12px;margin:0}
table{border-collapse:collapse;font-size:12px} td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4} td.txt,td:first-child,th:first-child{text-align:left}
.ok{background:#e6f4ea;border:1px solid #9bd1a9;padding:6px 10px}
.bad{background:#fdecea;border:1px solid #f1a199;padding:6px 10px} .bad li{font-family:monospace;font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.hist{border:1px solid #eee;padding:6px} .hist h3{margin:0 0 4px}
.agreement td.tau{text-align:center;min-width:80px}
.cands{display:flex;flex-wrap:wrap;gap:10px} .cand{border:1px solid #ddd;padding:6px;width:172px}
.thumb{width:160px;height:160px;object-fit:contain;image-rendering:pixelated;display:block;background:#eee}
.noimg{width:160px;height:160px;background:#fdecea;display:flex;align-items:center;justify-content:center}
.lab{font-size:12px;margin:4px 0;overflow-wrap:anywhere} .scores{width:100%} .scores td{font-size:11px;padding:1px 4px}
.cap{font-style:italic}
"""


def _page_head(job: str, rep, facts: str) -> str:
    """Doctype, title, styles and the heading line of a build's or a filter's page (``facts``: HTML)."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>synpref {job} '
            f'{_e(rep.output_dir)}</title><style>{CSS}</style></head><body>\n<h1>synpref {job} report</h1>'
            f'<p class="muted">{_e(rep.output_dir)} &middot; synpref '
            f'{_e(rep.manifest.get("synpref_version", ""))} &middot; {facts}</p>')


def _status(rep) -> str:
    if rep.findings:
        return ('<div class="bad"><b>PROBLEMS</b><ul>' + "".join(f"<li>{_e(f)}</li>" for f in rep.findings)
                + "</ul></div>")
    if rep.verified:
        return '<div class="ok"><b>verify: OK</b>, every shard re-read matches the manifest</div>'
    return '<div class="muted">shards not verified (--no-verify)</div>'


def _corpus_card(item: dict, rewards: list[str], note: str = "") -> str:
    """One corpus sample: thumbnail (or why there is none), key, caption, scores, and the drop's detail."""
    data = item.get("image")
    if data is None:
        pic = f'<div class="noimg">{_e(item.get("why", "image missing"))}</div>'
    else:
        try:
            pic = f'<img class="thumb" alt="{_e(item["key"])}" src="{thumbnail_data_uri(data)}">'
        except ImageDecodeError as exn:
            pic = f'<div class="noimg">{_e(exn.reason)}</div>'
    scores = "".join(f"<tr><td>{_e(r)}</td><td>{_num(item['scores'].get(r))}</td></tr>" for r in rewards
                     if r in item["scores"])
    caption = item.get("caption") or ""
    return (f'<div class="cand">{pic}<div class="lab"><b>{_e(item["key"])}</b><br>'
            f'<span class="cap">{_e(caption[:120])}</span>'
            + (f'<br><span class="muted">{_e(note[:160])}</span>' if note else "")
            + f'</div><table class="scores">{scores}</table></div>')


def render_filter_html(rep) -> str:
    """A filter output's report (``synpref.jobs.inspect_filter.FilterReport``) as one HTML document."""
    from synpref.jobs.inspect_filter import describe_filter

    m, rewards = rep.manifest, rep.rewards
    kept_mask = rep.scores["kept"].fill_null(False).to_numpy()
    hists = "".join(
        f'<div class="hist"><h3>{_e(r)}</h3>'
        f'{histogram_svg(rep.scores[r].to_numpy(), kept=kept_mask, marks=rep.cutoffs.get(r, ()))}</div>'
        for r in rewards)
    kept = "".join(_corpus_card(s, rewards) for s in rep.kept_samples) or '<p class="muted">nothing kept</p>'
    dropped = "".join(
        f'<div class="reason"><h3>{_e(reason)}</h3><div class="cands">'
        + "".join(_corpus_card(i, rewards, i.get("detail") or "") for i in items) + "</div></div>"
        for reason, items in rep.dropped_samples.items())
    dropped = f'<div class="row">{dropped}</div>' if dropped else '<p class="muted">no drops</p>'
    drops = _table(rep.drops) if rep.drops.height else '<p class="muted">no drops</p>'
    parts = [
        _page_head("filter", rep, f"{len(m.get('input_shards', []))} input shard(s) &rarr; "
                                  f"{len(m['shards'])} filtered shard(s)"),
        '<p class="muted">rewards: ' + ", ".join(_e(reward_label(r)) for r in m["rewards"])
        + f" &middot; filter: {_e(describe_filter(m))}</p>",
        _status(rep),
        '<h2>Counts</h2><div class="row">' + _table(rep.counts) + "</div>",
        "<h2>Drops by reason</h2>" + drops,
        "<h2>Scores per reward</h2>" + _table(rep.score_stats)
        + '<p class="muted">dark: kept, light: dropped; red: the threshold or top-fraction cutoff</p>'
        + f'<div class="row" style="margin-top:8px">{hists}</div>',
        "<h2>Reward agreement</h2><p class=\"muted\">Kendall tau-b between two rewards' scores over every scored "
        "sample, kept and dropped (blue: agree, red: disagree).</p>" + _agreement_table(rep, unit="samples"),
        f"<h2>Kept samples (first {len(rep.kept_samples)})</h2>" + f'<div class="cands">{kept}</div>',
        "<h2>Dropped samples, a few per reason</h2>" + dropped,
        "</body></html>",
    ]
    return "\n".join(parts)


def render_html(rep: InspectReport) -> str:
    """The report as one self-contained HTML document (a filter output's has its own layout)."""
    if getattr(rep, "job", "build") == "filter":
        return render_filter_html(rep)
    m = rep.manifest
    rewards = rep.rewards
    status = _status(rep)
    hists = "".join(
        f'<div class="hist"><h3>{_e(r)}</h3>{histogram_svg(rep.scores[r].drop_nulls().to_numpy())}</div>'
        for r in rewards)
    samples, shown_images = [], 0
    for s in rep.samples:
        block, n = _sample_html(s, rewards)
        samples.append(block)
        shown_images += n
    drops = _table(rep.drops) if rep.drops.height else '<p class="muted">no drops</p>'
    parts = [
        _page_head("build", rep, f"aggregator {_e(m.get('aggregator', ''))} &middot; "
                                 f"{len(m['shards'])} ranked + {len(m['shards'])} pairwise shards"),
        '<p class="muted">rewards: ' + ", ".join(_e(reward_label(r)) for r in m["rewards"])
        + " &middot; generators: " + ", ".join(f"{_e(g['id'])}" for g in m["generators"]) + "</p>",
        status,
        '<h2>Counts</h2><div class="row">' + _table(rep.counts) + "</div>",
        "<h2>Drops by reason</h2>" + drops,
        "<h2>Scores per reward</h2>" + _table(rep.score_stats) + f'<div class="row" style="margin-top:8px">{hists}</div>',
        "<h2>Reward agreement</h2><p class=\"muted\">Kendall tau-b between two rewards' scores within each prompt's "
        "candidates, averaged over prompts (blue: agree, red: disagree).</p>" + _agreement_table(rep),
        f"<h2>First {len(rep.samples)} prompts, candidates in rank order</h2>"
        f'<p class="muted">{shown_images} images</p>' + "".join(samples),
        "</body></html>",
    ]
    return "\n".join(parts)


def write_html(rep: InspectReport, path: str) -> str:
    import fsspec

    with fsspec.open(path, "w", encoding="utf-8") as f:
        f.write(render_html(rep))
    return path
