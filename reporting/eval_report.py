"""The report of ``synpref evaluate``: every figure from ``samples.parquet``, as JSON, a terminal table and HTML.

``evaluation_summary`` reads the samples (one row per image: ``model``, ``prompt_id``, ``prompt``,
``category``, ``seed``, ``image`` and one raw score column per judge) and computes, for every model against
the baseline (the first model) and every judge, the paired figures of ``synpref.reporting.eval_stats``,
overall and per prompt category, plus the Syn-Pic label over all judges. ``format_evaluation`` prints them
compactly; ``write_evaluation_html`` writes one self-contained page (thumbnails embedded as base64 like
``synpref inspect --html``, so the page can be copied or served anywhere). Definitions:
docs/evaluate_report.md.

A (prompt, seed) that lacks a row or a finite score on either side of a comparison is left out of it and
counted (``missing_pairs``). The summary is strict JSON (undefined figures are None) and deterministic.
"""
from __future__ import annotations

import json
import math
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import polars as pl

from synpref.jobs.html_report import CSS, _e, _num, _table, histogram_svg, thumbnail_data_uri
from synpref.reporting.eval_stats import (CONFIDENCE, mean_with_interval, paired_comparison,
                                          syn_pic_phi)
from synpref.transforms.imageio import ImageDecodeError

REQUIRED_COLUMNS = ("model", "prompt_id", "prompt", "category", "seed", "image")
GAMED_NOTE = ("A judge that was also a training reward of an evaluated model can be gamed: training on a reward "
              "raises that reward's score whether or not the images got better; a held-out judge is the honest "
              "measure")
SYN_PIC = "Syn-Pic"


@dataclass
class Samples:
    """samples.parquet as arrays over keys = sorted (prompt_id, seed) pairs present for any listed model."""

    models: list[str]
    judges: list[str]
    prompt_ids: np.ndarray  # [keys] str
    seeds: np.ndarray  # [keys] int
    categories: np.ndarray  # [keys] str, the prompt's category
    prompts: dict  # prompt_id -> text
    scores: np.ndarray  # [keys, models, judges] float, NaN where no row or no finite score
    images: np.ndarray  # [keys, models] object: relative PNG path or None
    present: np.ndarray  # [keys, models] bool: the model has a row for this (prompt, seed)
    rows: int  # rows of the listed models
    rows_ignored: int  # rows of models not listed


def load_samples(samples_parquet_path: str, models: list[str], judges: list[str]) -> Samples:
    """Read and check samples.parquet (any fsspec URL); ValueError names what does not fit."""
    if not models:
        raise ValueError("evaluation needs at least one model (the first is the baseline)")
    if len(set(models)) != len(models):
        raise ValueError(f"model names must be unique, got {models}")
    if not judges or len(set(judges)) != len(judges):
        raise ValueError(f"evaluation needs at least one judge, names unique; got {judges}")
    with fsspec.open(samples_parquet_path, "rb") as f:
        df = pl.read_parquet(f)
    missing = [c for c in (*REQUIRED_COLUMNS, *judges) if c not in df.columns]
    if missing:
        raise ValueError(f"{samples_parquet_path}: missing column(s) {missing}")
    not_numeric = [j for j in judges if not df.schema[j].is_numeric()]
    if not_numeric:
        raise ValueError(f"{samples_parquet_path}: judge column(s) {not_numeric} are not numeric")
    df = df.select(pl.col("model").cast(pl.Utf8), pl.col("prompt_id").cast(pl.Utf8), pl.col("prompt").cast(pl.Utf8),
                   pl.col("category").cast(pl.Utf8).fill_null(""), pl.col("seed").cast(pl.Int64),
                   pl.col("image").cast(pl.Utf8), *[pl.col(j).cast(pl.Float64) for j in judges])
    listed = df.filter(pl.col("model").is_in(models))
    absent = [m for m in models if m not in set(listed["model"].to_list())]
    if absent:
        raise ValueError(f"{samples_parquet_path}: no rows for model(s) {absent}")
    dup = listed.group_by("model", "prompt_id", "seed").len().filter(pl.col("len") > 1)
    if dup.height:
        r = dup.sort("model", "prompt_id", "seed").row(0, named=True)
        raise ValueError(f"{samples_parquet_path}: {dup.height} (model, prompt_id, seed) with several rows, "
                         f"e.g. ({r['model']!r}, {r['prompt_id']!r}, {r['seed']})")
    per_prompt = listed.group_by("prompt_id").agg(pl.col("category").n_unique().alias("nc"),
                                                  pl.col("prompt").n_unique().alias("np"),
                                                  pl.col("category").first(), pl.col("prompt").first())
    bad = per_prompt.filter((pl.col("nc") > 1) | (pl.col("np") > 1)).sort("prompt_id")
    if bad.height:
        raise ValueError(f"{samples_parquet_path}: prompt_id {bad['prompt_id'][0]!r} has several prompt texts or "
                         "categories")
    keys = listed.select("prompt_id", "seed").unique().sort("prompt_id", "seed").with_row_index("key")
    listed = listed.join(keys, on=["prompt_id", "seed"]).with_columns(
        pl.col("model").replace_strict({m: i for i, m in enumerate(models)}, return_dtype=pl.Int64).alias("mi"))
    n_keys = keys.height
    scores = np.full((n_keys, len(models), len(judges)), np.nan)
    k, mi = listed["key"].to_numpy(), listed["mi"].to_numpy()
    values = listed.select(judges).to_numpy().astype(np.float64)
    scores[k, mi] = np.where(np.isfinite(values), values, np.nan)  # inf counts as missing, like null
    images = np.full((n_keys, len(models)), None, dtype=object)
    images[k, mi] = np.array(listed["image"].to_list(), dtype=object)
    present = np.zeros((n_keys, len(models)), dtype=bool)
    present[k, mi] = True
    category = dict(zip(per_prompt["prompt_id"].to_list(), per_prompt["category"].to_list()))
    prompt_ids = keys["prompt_id"].to_numpy().astype(str)
    return Samples(models=list(models), judges=list(judges), prompt_ids=prompt_ids,
                   seeds=keys["seed"].to_numpy(), categories=np.array([category[p] for p in prompt_ids], dtype=str),
                   prompts=dict(zip(per_prompt["prompt_id"].to_list(), per_prompt["prompt"].to_list())),
                   scores=scores, images=images, present=present, rows=listed.height,
                   rows_ignored=df.height - listed.height)


def _stat(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _score_table(s: Samples) -> list[dict]:
    out = []
    for j, judge in enumerate(s.judges):
        for m, model in enumerate(s.models):
            v = s.scores[:, m, j]
            v = v[np.isfinite(v)]
            out.append({"model": model, "judge": judge, "n": int(v.size),
                        "missing_scores": int(s.present[:, m].sum() - v.size),
                        "mean": _stat(v.mean()) if v.size else None, "sd": _stat(v.std()) if v.size else None,
                        "min": _stat(v.min()) if v.size else None, "max": _stat(v.max()) if v.size else None})
    return out


def _comparisons(s: Samples, values: np.ndarray, label: str, gamed, *, seed: int, n_boot: int):
    """values [keys, models] (NaN: missing) -> (overall, per category) comparison lists of every model vs baseline."""
    overall, by_category = [], []
    cats = sorted(set(s.categories.tolist()))
    for m in range(1, len(s.models)):
        ok = np.isfinite(values[:, m]) & np.isfinite(values[:, 0])
        head = {"model": s.models[m], "baseline": s.models[0], "judge": label, "gamed": gamed(m)}
        overall.append({**head, "missing_pairs": int(len(ok) - ok.sum()),
                        **paired_comparison(s.prompt_ids[ok], values[ok, m], values[ok, 0], seed=seed, n_boot=n_boot)})
        if cats == [""]:
            continue  # no categories: the per-category table would repeat the overall one
        for c in cats:
            in_c = s.categories == c
            sel = ok & in_c
            by_category.append({"category": c, **head, "missing_pairs": int(in_c.sum() - sel.sum()),
                                **paired_comparison(s.prompt_ids[sel], values[sel, m], values[sel, 0], seed=seed,
                                                    n_boot=n_boot)})
    return overall, by_category


def _phi(s: Samples) -> tuple[np.ndarray, np.ndarray]:
    """(complete [keys] bool, phi [keys, models] with NaN off the complete groups)."""
    complete = np.isfinite(s.scores).all(axis=(1, 2))
    phi = np.full(s.scores.shape[:2], np.nan)
    if len(s.models) >= 2 and complete.any():
        phi[complete] = syn_pic_phi(s.scores[complete])
    return complete, phi


def evaluation_summary(samples_parquet_path: str, models: list[str], judges: list[str], *,
                       training_rewards: dict[str, list[str]], seed: int = 0, n_boot: int = 2000) -> dict:
    """Every reported figure of an evaluation, as a strict-JSON-able dict (None where undefined).

    Args:
        samples_parquet_path: samples.parquet (local path or fsspec URL).
        models: model names as in the ``model`` column; the first is the baseline.
        judges: judge names = score columns (raw scores, higher is better).
        training_rewards: model name -> the rewards it was trained on (from its train_summary.json and the
            build's manifest); a judge among them is flagged as gameable. Models absent: not trained.
        seed: seed of the bootstrap (a fresh ``np.random.default_rng(seed)`` per figure).
        n_boot: bootstrap resamples per interval.

    Returns:
        dict with ``baseline``, ``models``, ``judges``, ``method``, ``counts``, ``scores`` (per model and
        judge: n, mean, sd, min, max), ``comparisons`` and ``by_category`` (per model vs baseline and judge:
        wins/losses/ties, rates, intervals, sign-test p, mean difference and interval, missing pairs),
        ``syn_pic`` (the same over all judges, and each model's mean phi) and ``gamed_judges``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    unknown = sorted(set(training_rewards) - set(models))
    if unknown:
        raise ValueError(f"training_rewards names model(s) {unknown} that are not evaluated ({models})")
    s = load_samples(samples_parquet_path, models, judges)
    trained = {m: set(training_rewards.get(m, ())) for m in models}
    gamed_by = {j: [m for m in models if j in trained[m]] for j in judges}
    gamed_by = {j: ms for j, ms in gamed_by.items() if ms}

    comparisons, by_category = [], []
    for j, judge in enumerate(judges):
        over, cat = _comparisons(s, s.scores[:, :, j], judge,
                                 lambda m, judge=judge: judge in trained[s.models[m]] | trained[s.models[0]],
                                 seed=seed, n_boot=n_boot)
        comparisons += over
        by_category += cat

    complete, phi = _phi(s)
    syn = {"over_judges": list(judges), "groups": int(complete.sum()), "incomplete_groups": int((~complete).sum()),
           "includes_gamed_judges": bool(gamed_by), "per_model": [], "comparisons": [], "by_category": []}
    if len(models) >= 2:
        syn["per_model"] = [{"model": model, **mean_with_interval(s.prompt_ids[complete], phi[complete, m],
                                                                  seed=seed, n_boot=n_boot)}
                            for m, model in enumerate(models)]
        # Syn-Pic of one comparison is gameable when a judge in it was a training reward of either side
        syn["comparisons"], syn["by_category"] = _comparisons(
            s, phi, SYN_PIC, lambda m: bool((trained[s.models[m]] | trained[s.models[0]]) & set(judges)),
            seed=seed, n_boot=n_boot)
    cats = sorted(set(s.categories.tolist()))
    order = _order(models, judges)
    comparisons.sort(key=order)
    by_category.sort(key=order)
    return {
        "baseline": models[0], "models": list(models), "judges": list(judges),
        "method": {"confidence": CONFIDENCE, "seed": seed, "n_boot": n_boot,
                   "interval": "percentile bootstrap over prompts (all seeds of a prompt resampled together)",
                   "p_value": "exact two-sided sign test on wins vs losses, ties dropped",
                   "win_rate": "wins / pairs, ties counted apart; win_rate_ties_half = (wins + ties / 2) / pairs",
                   "syn_pic": "phi = share of (judge, other model's image of the same prompt and seed) comparisons "
                              "won strictly, over groups where every model has every judge's score"},
        "counts": {"rows": s.rows, "rows_ignored": s.rows_ignored, "pairs": len(s.prompt_ids),
                   "prompts": len(set(s.prompt_ids.tolist())), "seeds": len(set(s.seeds.tolist())),
                   "categories": cats if cats != [""] else [],
                   "images_per_model": {m: int(s.present[:, k].sum()) for k, m in enumerate(models)}},
        "scores": _score_table(s),
        "comparisons": comparisons,
        "by_category": by_category,
        "syn_pic": syn,
        "gamed_judges": [j for j in judges if j in gamed_by],
        "gamed_by": gamed_by,
        "held_out_judges": [j for j in judges if j not in gamed_by],
        "gamed_note": GAMED_NOTE if gamed_by else "",
    }


def _order(models: list[str], judges: list[str]):
    """Sort key of comparison rows: by model, then judge (Syn-Pic last), then category."""
    rank = {j: i for i, j in enumerate([*judges, SYN_PIC])}
    return lambda c: (models.index(c["model"]), rank[c["judge"]], c.get("category", ""))


def _all_comparisons(summary: dict, section: str) -> list[dict]:
    """The judges' and Syn-Pic's rows of one section ("comparisons" or "by_category"), model by model."""
    rows = summary[section] + summary["syn_pic"][section]
    return sorted(rows, key=_order(summary["models"], summary["judges"]))


def summary_json(summary: dict) -> str:
    """The summary as strict JSON text (raises on NaN), stable key order, newline-terminated."""
    return json.dumps(summary, indent=2, allow_nan=False) + "\n"


# -- terminal ------------------------------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _ci(ci, fmt: str) -> str:
    return "[-]" if ci is None else f"[{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def _p(p) -> str:
    return "-" if p is None else f"{p:.2g}"


def _comparison_line(c: dict, width: int) -> str:
    judge = c["judge"] + ("*" if c["gamed"] else "")
    line = (f"{c['model']} vs {c['baseline']}".ljust(width[0]) + "  " + judge.ljust(width[1])
            + f"  win {_f(c['win_rate'], '.2f')} {_ci(c['win_rate_ci'], '.2f')}  ties {c['ties']}"
            + f"  p={_p(c['p_value'])}  diff {_f(c['mean_diff'], '+.3g')} {_ci(c['mean_diff_ci'], '+.3g')}"
            + f"  n {c['n_pairs']}")
    return line + (f"  missing {c['missing_pairs']}" if c["missing_pairs"] else "")


def format_evaluation(summary: dict) -> str:
    """The summary as a compact terminal table: one line per model x judge, then per category and Syn-Pic."""
    n, cnt = summary["method"], summary["counts"]
    syn = summary["syn_pic"]
    every = summary["comparisons"] + syn["comparisons"] + summary["by_category"] + syn["by_category"]
    width = (max([len(f"{c['model']} vs {c['baseline']}") for c in every] + [0]),
             max([len(c["judge"]) + 1 for c in every] + [0]))
    lines = [f"evaluation  {len(summary['models'])} models x {len(summary['judges'])} judges, "
             f"{cnt['prompts']} prompts, {cnt['pairs']} (prompt, seed) pairs, baseline {summary['baseline']}",
             f"method      {n['confidence']:.0%} intervals: bootstrap over prompts ({n['n_boot']} resamples, seed "
             f"{n['seed']}); p: sign test, ties dropped; win = wins / pairs"]
    score_w = max(len(m) for m in summary["models"])
    lines.append("scores      mean (sd) per model")
    for judge in summary["judges"]:
        cells = [f"{r['model']} {_f(r['mean'], '.4g')} ({_f(r['sd'], '.3g')})" for r in summary["scores"]
                 if r["judge"] == judge]
        lines.append(f"  {judge.ljust(width[1] or score_w)}  " + "  ".join(cells))
    if summary["comparisons"]:
        lines.append(f"paired vs {summary['baseline']}")
        lines += ["  " + _comparison_line(c, width) for c in _all_comparisons(summary, "comparisons")]
    if syn["per_model"]:
        lines.append(f"{SYN_PIC}     mean phi over {syn['groups']} groups (all judges: {', '.join(syn['over_judges'])})"
                     + (f", {syn['incomplete_groups']} incomplete left out" if syn["incomplete_groups"] else ""))
        lines.append("  " + "  ".join(f"{r['model']} {_f(r['mean'], '.3f')} {_ci(r['mean_ci'], '.3f')}"
                                      for r in syn["per_model"]))
    if summary["by_category"]:
        lines.append("per category")
        for cat in summary["counts"]["categories"]:
            lines.append(f"  [{cat or '(none)'}]")
            lines += ["    " + _comparison_line(c, width) for c in _all_comparisons(summary, "by_category")
                      if c["category"] == cat]
    if summary["gamed_judges"]:
        trained = "; ".join(f"{j} is a training reward of {', '.join(ms)}" for j, ms in summary["gamed_by"].items())
        lines.append(f"* gameable: {trained} ({SYN_PIC} includes it). {summary['gamed_note']}.")
    return "\n".join(lines)


# -- HTML ----------------------------------------------------------------------------------------------------

FOREST_CSS = """
.forest text{font-size:12px} .gamed{color:#c05a00} td.best{font-weight:bold} table.cmp td{white-space:nowrap}
.group{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin:4px 0 10px}
.seed{font-size:12px;color:#555;width:60px}
"""


def forest_svg(rows: list[dict], width: int = 840) -> str:
    """Inline SVG forest plot: per comparison the win rate with ties as half and its interval, on [0, 1].

    0.5 (dashed) is no difference whatever the share of ties; gamed judges are drawn orange.
    """
    label_w, text_w, row_h, top = 230, 230, 22, 22
    x0, x1 = label_w + 10, width - text_w
    height = top + row_h * len(rows) + 24

    def x(v):
        return x0 + (x1 - x0) * v

    parts = [f'<line x1="{x(0.5):.1f}" y1="{top - 6}" x2="{x(0.5):.1f}" y2="{height - 20}" stroke="#888" '
             f'stroke-dasharray="4,3"/>']
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(t):.1f}" y1="{height - 22}" x2="{x(t):.1f}" y2="{height - 18}" stroke="#888"/>'
                     f'<text x="{x(t):.1f}" y="{height - 6}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{x(0.5):.1f}" y="{top - 10}" text-anchor="middle">win rate, ties as half '
                 f'(0.5 = no difference)</text>')
    for i, c in enumerate(rows):
        y = top + row_h * i + row_h / 2
        colour = "#c05a00" if c["gamed"] else "#1f4e8c"
        label = f"{c['model']} vs {c['baseline']} · {c['judge']}{'*' if c['gamed'] else ''}"
        parts.append(f'<text class="label" x="{label_w}" y="{y + 4:.1f}" text-anchor="end">{_e(label)}</text>')
        r, ci = c["win_rate_ties_half"], c["win_rate_ties_half_ci"]
        if r is None:
            parts.append(f'<text x="{x(0.5):.1f}" y="{y + 4:.1f}" text-anchor="middle">no pairs</text>')
            continue
        parts.append(f'<line class="ci" data-lo="{ci[0]:.6g}" data-hi="{ci[1]:.6g}" x1="{x(ci[0]):.1f}" '
                     f'y1="{y:.1f}" x2="{x(ci[1]):.1f}" y2="{y:.1f}" stroke="{colour}" stroke-width="2"/>'
                     f'<circle class="point" data-rate="{r:.6g}" cx="{x(r):.1f}" cy="{y:.1f}" r="4.5" '
                     f'fill="{colour}"><title>{_e(label)}: {r:.3f} [{ci[0]:.3f}, {ci[1]:.3f}], p={_p(c["p_value"])}'
                     f'</title></circle>'
                     f'<text x="{x1 + 10}" y="{y + 4:.1f}">{r:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] p={_p(c["p_value"])}'
                     f'</text>')
    return (f'<svg class="forest" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">' + "".join(parts) + "</svg>")


def _ci_html(ci, fmt: str) -> str:
    return "&ndash;" if ci is None else f"[{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def _comparison_table(rows: list[dict], category: bool = False) -> str:
    head = (["category"] if category else []) + ["model", "vs", "judge", "pairs", "missing", "wins", "losses", "ties",
                                                 "win rate [95%]", "ties as half [95%]", "sign test p",
                                                 "mean diff [95%]"]
    body = []
    for c in rows:
        judge = f'<span class="gamed">{_e(c["judge"])}*</span>' if c["gamed"] else _e(c["judge"])
        cells = ([f'<td class="txt">{_e(c["category"] or "(none)")}</td>'] if category else []) + [
            f'<td class="txt">{_e(c["model"])}</td>', f'<td class="txt">{_e(c["baseline"])}</td>',
            f'<td class="txt">{judge}</td>', *(f"<td>{c[k]}</td>" for k in ("n_pairs", "missing_pairs", "wins",
                                                                          "losses", "ties")),
            f"<td>{_f(c['win_rate'], '.3f')} {_ci_html(c['win_rate_ci'], '.3f')}</td>",
            f"<td>{_f(c['win_rate_ties_half'], '.3f')} {_ci_html(c['win_rate_ties_half_ci'], '.3f')}</td>",
            f"<td>{_p(c['p_value'])}</td>",
            f"<td>{_f(c['mean_diff'], '+.4g')} {_ci_html(c['mean_diff_ci'], '+.4g')}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return ('<table class="cmp"><thead><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def _safe_relative(path) -> bool:
    """A PNG path inside the output folder: relative, no scheme, no '..' (never read outside it)."""
    return (isinstance(path, str) and path != "" and "://" not in path and not path.startswith(("/", "\\"))
            and ".." not in posixpath.normpath(path.replace("\\", "/")).split("/"))


def _image_card(s: Samples, output_dir: str, key: int, m: int, best: list[bool], phi: float) -> str:
    rel = s.images[key, m]
    if not s.present[key, m]:
        pic = '<div class="noimg">no row</div>'
    elif rel is None:
        pic = '<div class="noimg">no image path</div>'
    elif not _safe_relative(rel):
        pic = f'<div class="noimg">not a path inside the output folder: {_e(rel)}</div>'
    else:
        try:
            with fsspec.open(f"{output_dir.rstrip('/')}/{rel}", "rb") as f:
                data = f.read()
            pic = (f'<img class="thumb" alt="{_e(s.models[m])}" title="{_e(rel)}" data-image="{_e(rel)}" '
                   f'src="{thumbnail_data_uri(data)}">')
        except FileNotFoundError:
            pic = f'<div class="noimg">missing: {_e(rel)}</div>'
        except ImageDecodeError as exn:
            pic = f'<div class="noimg">{_e(exn.reason)}</div>'
    scores = "".join(f'<tr><td>{_e(j)}</td><td class="{"best" if best[i] else ""}">{_num(_stat(s.scores[key, m, i]))}'
                     f"</td></tr>" for i, j in enumerate(s.judges))
    phi_row = f"<tr><td>{SYN_PIC} phi</td><td>{_num(_stat(phi))}</td></tr>" if len(s.models) >= 2 else ""
    return (f'<div class="cand" data-model="{_e(s.models[m])}">{pic}<div class="lab"><b>{_e(s.models[m])}</b></div>'
            f'<table class="scores">{scores}{phi_row}</table></div>')


def render_evaluation_html(summary: dict, output_dir: str, *, n_prompts: int = 8) -> str:
    """The evaluation page as one self-contained HTML document (reads ``output_dir``/samples.parquet and PNGs)."""
    s = load_samples(f"{output_dir.rstrip('/')}/samples.parquet", summary["models"], summary["judges"])
    if s.rows != summary["counts"]["rows"]:
        raise ValueError(f"{output_dir}/samples.parquet has {s.rows} rows, the summary counted "
                         f"{summary['counts']['rows']}: the summary is stale, recompute it")
    _, phi = _phi(s)
    cnt, meth, syn = summary["counts"], summary["method"], summary["syn_pic"]
    gamed = ""
    if summary["gamed_judges"]:
        gamed = ('<div class="bad"><b>* gameable judges</b>: '
                 + "; ".join(f"{_e(j)} (a training reward of {_e(', '.join(ms))})"
                             for j, ms in summary["gamed_by"].items())
                 + f"; {SYN_PIC} includes it. {_e(summary['gamed_note'])}. Held-out judges: "
                 + (_e(", ".join(summary["held_out_judges"])) or "none") + ".</div>")
    score_rows = pl.DataFrame(summary["scores"]).select("judge", "model", "n", "missing_scores", "mean", "sd", "min",
                                                        "max")
    hist_rows = []
    for j, judge in enumerate(s.judges):
        finite = s.scores[:, :, j][np.isfinite(s.scores[:, :, j])]
        rng = (float(finite.min()), float(finite.max())) if finite.size else None
        cells = "".join(
            f'<div class="hist" data-judge="{_e(judge)}" data-model="{_e(model)}"><h3>{_e(model)}</h3>'
            + histogram_svg(s.scores[:, m, j], width=260, height=110, value_range=rng,
                            marks=[(r["mean"], "mean")] if r["mean"] is not None else ())
            + "</div>"
            for m, (model, r) in enumerate(zip(s.models, [r for r in summary["scores"] if r["judge"] == judge])))
        hist_rows.append(f'<h3>{_e(judge)}{"*" if judge in summary["gamed_by"] else ""}</h3><div class="row">{cells}'
                         "</div>")
    shown = sorted(set(s.prompt_ids.tolist()))[:n_prompts]
    groups = []
    for pid in shown:
        rows = []
        for key in np.flatnonzero(s.prompt_ids == pid):
            sc = s.scores[key]  # [models, judges]
            best = [[bool(np.isfinite(sc[m, j]) and sc[m, j] == np.nanmax(sc[:, j]) and np.isfinite(sc[:, j]).sum() > 1)
                     for j in range(len(s.judges))] for m in range(len(s.models))]
            cards = "".join(_image_card(s, output_dir, key, m, best[m], phi[key, m]) for m in range(len(s.models)))
            rows.append(f'<div class="group"><div class="seed">seed {int(s.seeds[key])}</div>{cards}</div>')
        cat = s.categories[s.prompt_ids == pid][0]
        groups.append(f'<section class="sample"><h3 class="prompt">{_e(s.prompts[pid])}</h3><p class="muted">'
                      f'[{_e(cat or "no category")}] prompt_id {_e(pid)}</p>{"".join(rows)}</section>')
    syn_table = ""
    if syn["per_model"]:
        syn_table = ("<table><thead><tr><th>model</th><th>groups</th><th>mean phi [95%]</th></tr></thead><tbody>"
                     + "".join(f'<tr><td class="txt">{_e(r["model"])}</td><td>{r["n"]}</td>'
                               f"<td>{_f(r['mean'], '.3f')} {_ci_html(r['mean_ci'], '.3f')}</td></tr>"
                               for r in syn["per_model"]) + "</tbody></table>"
                     + f'<p class="muted">over judges {_e(", ".join(syn["over_judges"]))}; {syn["groups"]} '
                       f'(prompt, seed) groups with every score, {syn["incomplete_groups"]} incomplete left out</p>')
    every = _all_comparisons(summary, "comparisons")
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n<title>synpref evaluate '
        f'{_e(output_dir)}</title><style>{CSS}{FOREST_CSS}</style></head><body>\n<h1>synpref evaluate report</h1>',
        f'<p class="muted">{_e(output_dir)} &middot; baseline <b>{_e(summary["baseline"])}</b> &middot; models '
        f'{_e(", ".join(summary["models"]))} &middot; judges {_e(", ".join(summary["judges"]))} &middot; '
        f'{cnt["prompts"]} prompts, {cnt["pairs"]} (prompt, seed) pairs, {cnt["rows"]} images</p>',
        f'<p class="muted">{meth["confidence"]:.0%} intervals: {_e(meth["interval"])}, {meth["n_boot"]} resamples, '
        f'seed {meth["seed"]}; p: {_e(meth["p_value"])}; {_e(meth["win_rate"])}.</p>',
        gamed,
        f"<h2>Win rates against {_e(summary['baseline'])}</h2>"
        + (forest_svg(every) + '<p class="muted">orange, *: the judge was a training reward (gameable)</p>'
         + _comparison_table(every) if every else '<p class="muted">one model: nothing to '
                                                                        "compare</p>"),
        (f"<h2>Per prompt category</h2>" + _comparison_table(
            sorted(_all_comparisons(summary, "by_category"), key=lambda c: c["category"]), True))
        if summary["by_category"] else "",
        (f"<h2>{SYN_PIC} label over all judges</h2>" + syn_table) if syn_table else "",
        "<h2>Scores per judge and model</h2>" + _table(score_rows) + "".join(hist_rows)
        + '<p class="muted">one x scale per judge; red: the model\'s mean</p>',
        f"<h2>First {len(shown)} prompts: the models' images side by side</h2>"
        '<p class="muted">bold: the best score of a judge among the images of one (prompt, seed)</p>'
        + "".join(groups),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_evaluation_html(summary: dict, output_dir: str, html_path: str, *, n_prompts: int = 8) -> str:
    """Write the page (``render_evaluation_html``) to ``html_path`` (any fsspec URL); returns the path.

    Thumbnails are embedded (base64), so the page stands alone wherever it is written.
    """
    page = render_evaluation_html(summary, output_dir, n_prompts=n_prompts)
    with fsspec.open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    return html_path
