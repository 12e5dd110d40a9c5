"""The report of ``synpref evaluate`` (synpref.reporting.eval_report) on small synthetic samples.parquet files.

Expected figures are recomputed here from the rows with plain Python (dict loops, ``statistics``,
``math.comb``) and the project's ``syn_pic`` labelling aggregator, never with the code under test.
"""
import base64
import io
import json
import math
import re
import statistics
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest
from PIL import Image

from synpref.reporting.eval_report import (evaluation_summary, format_evaluation, render_evaluation_html,
                                           summary_json, write_evaluation_html)
from synpref.transforms.aggregators import get_aggregator

MODELS = ["base", "tuned", "flipped"]
JUDGES = ["brisque", "sharpness"]
CATEGORIES = ["animals", "objects", "scenes"]


def _write_samples(out, *, drop=(), nan=(), extra_rows=(), categories=True, n_prompts=9, seeds=2):
    """A samples.parquet with PNGs; ``drop``: (model, prompt_id, seed) rows left out; ``nan``: (..., judge) NaN."""
    rng = np.random.default_rng(3)
    rows = []
    (out / "images").mkdir(parents=True, exist_ok=True)
    for p in range(n_prompts):
        pid = f"p{p:02d}"
        for seed in range(seeds):
            for mi, model in enumerate(MODELS):
                if (model, pid, seed) in drop:
                    continue
                rel = f"images/{model}_{pid}_{seed}.png"
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).resize((48, 48), Image.NEAREST).save(out / rel)
                row = {"model": model, "prompt_id": pid, "prompt": f"a prompt number {p}",
                       "category": CATEGORIES[p % 3] if categories else "", "seed": seed, "image": rel,
                       # brisque: continuous, tuned better on average; sharpness: one decimal, so ties happen
                       "brisque": float(rng.normal(0.4 * (mi == 1) - 0.2 * (mi == 2), 1.0)),
                       "sharpness": float(np.round(rng.normal(0.0, 0.3), 1))}
                for judge in JUDGES:
                    if (model, pid, seed, judge) in nan:
                        row[judge] = float("nan")
                rows.append(row)
    rows += list(extra_rows)
    pl.DataFrame(rows).write_parquet(out / "samples.parquet")
    return rows


DROP = {("tuned", "p02", 1), ("base", "p05", 0)}  # missing rows: tuned's leaves tuned's comparisons, base's all
NAN = {("flipped", "p04", 0, "sharpness")}  # a missing score: leaves flipped's sharpness comparison only
EXTRA = [{"model": "other", "prompt_id": "p00", "prompt": "a prompt number 0", "category": "animals", "seed": 0,
          "image": "images/none.png", "brisque": 0.0, "sharpness": 0.0}]  # a model not evaluated: ignored


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    rows = _write_samples(out, drop=DROP, nan=NAN, extra_rows=EXTRA)
    summary = evaluation_summary(str(out / "samples.parquet"), MODELS, JUDGES,
                                 training_rewards={"tuned": ["brisque", "clip_score"]}, seed=7, n_boot=500)
    return out, rows, summary


def _score(rows, model, pid, seed, judge):
    for r in rows:
        if (r["model"], r["prompt_id"], r["seed"]) == (model, pid, seed):
            v = r[judge]
            return v if math.isfinite(v) else None
    return None


def _expected_pairs(rows, model, judge, category=None):
    keys = sorted({(r["prompt_id"], r["seed"]) for r in rows if r["model"] in MODELS})
    cat = {r["prompt_id"]: r["category"] for r in rows}
    pairs, missing = [], 0
    for pid, seed in keys:
        if category is not None and cat[pid] != category:
            continue
        m, b = _score(rows, model, pid, seed, judge), _score(rows, "base", pid, seed, judge)
        if m is None or b is None:
            missing += 1
        else:
            pairs.append((pid, m, b))
    return pairs, missing


def _sign_p(w, lose):
    n = w + lose
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(w, lose) + 1)) / 2 ** n) if n else None


def _find(items, **kw):
    hits = [c for c in items if all(c.get(k) == v for k, v in kw.items())]
    assert len(hits) == 1, (kw, len(hits))
    return hits[0]


def test_counts_scores_and_every_paired_figure(evaluated):
    out, rows, s = evaluated
    assert s["baseline"] == "base" and s["models"] == MODELS and s["judges"] == JUDGES
    assert s["counts"]["rows"] == len(rows) - 1 and s["counts"]["rows_ignored"] == 1
    assert s["counts"]["pairs"] == 18 and s["counts"]["prompts"] == 9 and s["counts"]["seeds"] == 2
    assert s["counts"]["categories"] == CATEGORIES
    assert s["counts"]["images_per_model"] == {"base": 17, "tuned": 17, "flipped": 18}
    for model in MODELS:
        for judge in JUDGES:
            v = [r[judge] for r in rows if r["model"] == model and math.isfinite(r[judge])]
            got = _find(s["scores"], model=model, judge=judge)
            assert got["n"] == len(v) and got["mean"] == pytest.approx(statistics.fmean(v))
            assert got["sd"] == pytest.approx(statistics.pstdev(v)) and (got["min"], got["max"]) == (min(v), max(v))
    assert _find(s["scores"], model="flipped", judge="sharpness")["missing_scores"] == 1

    assert len(s["comparisons"]) == 4 and [(c["model"], c["judge"]) for c in s["comparisons"]] == [
        ("tuned", "brisque"), ("tuned", "sharpness"), ("flipped", "brisque"), ("flipped", "sharpness")]
    for c in s["comparisons"]:
        pairs, missing = _expected_pairs(rows, c["model"], c["judge"])
        d = [m - b for _, m, b in pairs]
        wins, losses, ties = sum(x > 0 for x in d), sum(x < 0 for x in d), sum(x == 0 for x in d)
        assert (c["wins"], c["losses"], c["ties"], c["n_pairs"], c["missing_pairs"]) == (
            wins, losses, ties, len(d), missing)
        assert c["win_rate"] == wins / len(d) and c["win_rate_ties_half"] == (wins + ties / 2) / len(d)
        assert c["p_value"] == pytest.approx(_sign_p(wins, losses), rel=1e-12)
        assert c["mean_diff"] == pytest.approx(statistics.fmean(d))
        assert c["win_rate_ci"][0] <= c["win_rate"] <= c["win_rate_ci"][1]
        assert c["mean_diff_ci"][0] <= c["mean_diff"] <= c["mean_diff_ci"][1]
    assert _find(s["comparisons"], model="tuned", judge="brisque")["missing_pairs"] == 2  # the dropped rows
    assert _find(s["comparisons"], model="flipped", judge="sharpness")["missing_pairs"] == 2  # + the NaN score
    assert _find(s["comparisons"], model="flipped", judge="brisque")["missing_pairs"] == 1
    assert sum(c["ties"] for c in s["comparisons"] if c["judge"] == "sharpness") > 0  # ties counted apart

    # the bootstrap over prompts of one comparison, as a plain loop over the documented draws
    c = _find(s["comparisons"], model="tuned", judge="brisque")
    pairs, _ = _expected_pairs(rows, "tuned", "brisque")
    order = sorted({p for p, _, _ in pairs})
    idx = np.random.default_rng(7).integers(0, len(order), size=(500, len(order)))
    rates = []
    for row in idx:
        drawn = [m > b for k in row for p, m, b in pairs if p == order[k]]
        rates.append(sum(drawn) / len(drawn))
    assert c["win_rate_ci"] == pytest.approx(list(np.quantile(rates, [0.025, 0.975])), abs=1e-12)


def test_per_category_figures(evaluated):
    out, rows, s = evaluated
    assert len(s["by_category"]) == 2 * 2 * 3
    for c in s["by_category"]:
        pairs, missing = _expected_pairs(rows, c["model"], c["judge"], c["category"])
        d = [m - b for _, m, b in pairs]
        assert (c["wins"], c["losses"], c["ties"], c["missing_pairs"]) == (
            sum(x > 0 for x in d), sum(x < 0 for x in d), sum(x == 0 for x in d), missing)
        assert c["n_prompts"] == 3 and c["mean_diff"] == pytest.approx(statistics.fmean(d))
    # p02 and p05 are in "scenes" (2 % 3): their missing rows show there only
    assert _find(s["by_category"], model="tuned", judge="brisque", category="scenes")["missing_pairs"] == 2
    assert _find(s["by_category"], model="tuned", judge="brisque", category="animals")["missing_pairs"] == 0


def test_syn_pic_over_all_judges_matches_the_labelling_aggregator(evaluated):
    out, rows, s = evaluated
    syn = s["syn_pic"]
    label = get_aggregator("syn_pic").fn
    keys = sorted({(r["prompt_id"], r["seed"]) for r in rows if r["model"] in MODELS})
    phi = {}
    for pid, seed in keys:
        table = [[_score(rows, m, pid, seed, j) for j in JUDGES] for m in MODELS]
        if all(v is not None for t in table for v in t):
            phi[(pid, seed)] = dict(zip(MODELS, label(np.array(table), None, {}, {})[1]))
    assert syn["groups"] == len(phi) == 15 and syn["incomplete_groups"] == 3
    assert syn["over_judges"] == JUDGES and syn["includes_gamed_judges"] is True
    for r in syn["per_model"]:
        assert r["n"] == 15 and r["mean"] == pytest.approx(statistics.fmean(p[r["model"]] for p in phi.values()))
        assert r["mean_ci"][0] <= r["mean"] <= r["mean_ci"][1]
    for model in ("tuned", "flipped"):
        c = _find(syn["comparisons"], model=model)
        d = [p[model] - p["base"] for p in phi.values()]
        assert (c["wins"], c["losses"], c["ties"], c["missing_pairs"]) == (
            sum(x > 0 for x in d), sum(x < 0 for x in d), sum(x == 0 for x in d), 3)
        assert c["judge"] == "Syn-Pic" and c["gamed"] is (model == "tuned")  # brisque, a judge, trained tuned
    assert len(syn["by_category"]) == 2 * 3


def test_gamed_judges_are_the_training_rewards_among_the_judges(evaluated):
    _, _, s = evaluated
    assert s["gamed_judges"] == ["brisque"] and s["gamed_by"] == {"brisque": ["tuned"]}
    assert s["held_out_judges"] == ["sharpness"] and "held-out judge is the honest" in s["gamed_note"]
    assert _find(s["comparisons"], model="tuned", judge="brisque")["gamed"] is True
    assert _find(s["comparisons"], model="flipped", judge="brisque")["gamed"] is False  # flipped never saw it
    assert _find(s["comparisons"], model="tuned", judge="sharpness")["gamed"] is False


def test_summary_is_strict_json_and_deterministic(evaluated, tmp_path):
    out, _, s = evaluated
    text = summary_json(s)
    assert json.loads(text) == s and "NaN" not in text and "Infinity" not in text
    again = evaluation_summary(str(out / "samples.parquet"), MODELS, JUDGES,
                               training_rewards={"tuned": ["brisque", "clip_score"]}, seed=7, n_boot=500)
    assert summary_json(again) == text
    other = evaluation_summary(str(out / "samples.parquet"), MODELS, JUDGES, training_rewards={}, seed=8, n_boot=500)
    assert other["comparisons"][0]["win_rate_ci"] != s["comparisons"][0]["win_rate_ci"]
    assert other["gamed_judges"] == [] and other["gamed_note"] == ""


def test_all_ties_no_categories_and_one_model(tmp_path):
    rows = _write_samples(tmp_path, categories=False, n_prompts=3)
    tied = pl.read_parquet(tmp_path / "samples.parquet")
    base = tied.filter(pl.col("model") == "base").select("prompt_id", "seed", "brisque", "sharpness")
    tied = tied.drop("brisque", "sharpness").join(base, on=["prompt_id", "seed"])  # every model = base's scores
    tied.write_parquet(tmp_path / "samples.parquet")
    s = evaluation_summary(str(tmp_path / "samples.parquet"), MODELS, JUDGES, training_rewards={}, n_boot=50)
    assert s["by_category"] == [] and s["counts"]["categories"] == []
    for c in s["comparisons"] + s["syn_pic"]["comparisons"]:
        assert (c["wins"], c["losses"], c["ties"]) == (0, 0, 6) and c["p_value"] is None
        assert c["win_rate_ties_half"] == 0.5 and c["mean_diff"] == 0.0
    assert all(r["mean"] == 0.0 for r in s["syn_pic"]["per_model"])  # all tied: nobody wins anything
    json.loads(summary_json(s))
    text = format_evaluation(s)
    assert "p=-" in text and "per category" not in text
    solo = evaluation_summary(str(tmp_path / "samples.parquet"), ["base"], JUDGES, training_rewards={}, n_boot=50)
    assert solo["comparisons"] == [] and solo["syn_pic"]["per_model"] == [] and len(solo["scores"]) == 2
    assert len(rows) == 18
    assert "paired vs" not in format_evaluation(solo)
    page = render_evaluation_html(solo, str(tmp_path))
    assert "one model: nothing to compare" in page and page.count("<img ") == 6  # 3 prompts x 2 seeds
    pl.read_parquet(tmp_path / "samples.parquet").head(10).write_parquet(tmp_path / "samples.parquet")
    with pytest.raises(ValueError, match="the summary is stale"):
        render_evaluation_html(solo, str(tmp_path))


def test_format_evaluation_lines(evaluated):
    _, _, s = evaluated
    text = format_evaluation(s)
    c = _find(s["comparisons"], model="tuned", judge="brisque")
    lo, hi = c["win_rate_ci"]
    line = next(x for x in text.splitlines() if "tuned vs base" in x and "brisque*" in x)
    assert f"win {c['win_rate']:.2f} [{lo:.2f}, {hi:.2f}]  ties {c['ties']}  p={c['p_value']:.2g}" in line
    assert f"diff {c['mean_diff']:+.3g}" in line and "missing 2" in line
    assert re.search(r"flipped vs base +brisque  ", text)  # no marker: flipped was not trained on it
    assert "* gameable: brisque is a training reward of tuned" in text
    assert "[animals]" in text and "Syn-Pic" in text


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.cards, self.hists, self.points, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        elif tag == "div" and a.get("class") == "cand":
            self.cards.append(a["data-model"])
        elif tag == "div" and a.get("class") == "hist":
            self.hists.append((a["data-judge"], a["data-model"]))
        elif tag == "circle":
            self.points.append(float(a["data-rate"]))

    def handle_data(self, data):
        self.text.append(data)


def test_html_page_shows_every_image_model_and_judge(evaluated, tmp_path):
    out, rows, s = evaluated
    path = write_evaluation_html(s, str(out), str(tmp_path / "report.html"), n_prompts=3)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert path == str(tmp_path / "report.html")
    assert render_evaluation_html(s, str(out), n_prompts=3) == page  # same input, same bytes
    assert not re.search(r"""(src|href)=["'](?!data:)""", page) and "<script" not in page  # self-contained
    parser = _Page()
    parser.feed(page)
    body = "".join(parser.text)
    # first 3 prompts x 2 seeds x 3 models = 18 cards; the dropped row (tuned p02 seed 1) shows as "no row"
    assert len(parser.cards) == 18 and sorted(set(parser.cards)) == sorted(MODELS)
    assert len(parser.imgs) == 17 and "no row" in body
    for img in parser.imgs:
        rel = img["data-image"]
        assert (out / rel).is_file()
        shown = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1])))
        thumb = Image.open(out / rel).convert("RGB")
        thumb.thumbnail((160, 160))
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(thumb))  # the file's own pixels
    assert sorted(parser.hists) == sorted((j, m) for j in JUDGES for m in MODELS)
    for name in MODELS + JUDGES + ["Syn-Pic"]:
        assert name in body
    every = [c for c in s["comparisons"] + s["syn_pic"]["comparisons"]]
    assert sorted(parser.points) == pytest.approx(sorted(c["win_rate_ties_half"] for c in every), abs=1e-6)
    assert "gameable judges" in body and "Held-out judges: sharpness" in body
    for pid in ("p00", "p01", "p02"):
        assert f"prompt_id {pid}" in body
    assert "prompt_id p03" not in body


def test_bad_input_is_one_clear_error(tmp_path):
    _write_samples(tmp_path, n_prompts=2)
    path = str(tmp_path / "samples.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['aesthetic'\]"):
        evaluation_summary(path, MODELS, ["aesthetic"], training_rewards={})
    with pytest.raises(ValueError, match=r"no rows for model\(s\) \['ghost'\]"):
        evaluation_summary(path, ["base", "ghost"], JUDGES, training_rewards={})
    with pytest.raises(ValueError, match="not evaluated"):
        evaluation_summary(path, MODELS, JUDGES, training_rewards={"ghost": ["brisque"]})
    df = pl.read_parquet(path)
    pl.concat([df, df.head(1)]).write_parquet(path)
    with pytest.raises(ValueError, match=r"several rows, e.g. \('base', 'p00', 0\)"):
        evaluation_summary(path, MODELS, JUDGES, training_rewards={})
    df.with_columns(pl.when(pl.col("model") == "tuned").then(pl.lit("x")).otherwise(pl.col("category"))
                    .alias("category")).write_parquet(path)
    with pytest.raises(ValueError, match="several prompt texts or categories"):
        evaluation_summary(path, MODELS, JUDGES, training_rewards={})


def test_html_never_reads_outside_the_output_folder(tmp_path):
    out = tmp_path / "out"
    _write_samples(out, n_prompts=1, seeds=1)
    (tmp_path / "secret.png").write_bytes((out / "images/base_p00_0.png").read_bytes())
    df = pl.read_parquet(out / "samples.parquet")
    df.with_columns(pl.when(pl.col("model") == "base").then(pl.lit("../secret.png")).otherwise(pl.col("image"))
                    .alias("image")).write_parquet(out / "samples.parquet")
    s = evaluation_summary(str(out / "samples.parquet"), MODELS, JUDGES, training_rewards={}, n_boot=20)
    page = render_evaluation_html(s, str(out))
    assert "not a path inside the output folder: ../secret.png" in page
    assert page.count("<img ") == 2
