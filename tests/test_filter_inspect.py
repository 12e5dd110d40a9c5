"""``synpref inspect`` on a ``synpref filter`` output: text and HTML, the folder given checked, reward agreement.

The corpus is ``test_filter_corpus``'s (photographs, generated images and planted bad samples); expected
values come from the filter's own files (index Parquet, dead letters, manifest) read here with pyarrow and
json, and Kendall's tau from scipy (installed with scikit-image) and from a brute-force pair count.
"""
import itertools
import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.stats

from synpref.cli import main
from synpref.reporting.inspect_build import collect_report, kendall_tau_b
from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from test_filter_corpus import corpus, job  # noqa: F401 - the corpus fixture

REWARDS = ("brisque", "colourfulness", "resolution")


@pytest.fixture(scope="module")
def filtered(corpus, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("inspect_filter") / "out"
    cfg = job(corpus["root"], out, thresholds=[{"reward": "brisque", "min": -40}],
              top_fraction={"reward": "colourfulness", "fraction": 0.8})
    result = filter_corpus(filter_config_from_dict(cfg))
    assert result["summary"]["problems"] == []
    return out


def index_rows(out):
    return pq.read_table(sorted((out / "index").glob("*.parquet"))).to_pylist()


def test_inspect_text_and_html_on_a_filter_output(filtered, corpus, tmp_path, capsys):  # noqa: F811
    report = tmp_path / "filter.html"
    assert main(["inspect", str(filtered), "--html", str(report)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"filter output {filtered}") and "verify: OK" in text
    manifest = json.loads((filtered / "manifest.json").read_text())
    c = manifest["counts"]["samples"]
    assert re.search(rf"samples\s+in\s+{c['in']}\s+written\s+{c['written']}", text)

    rep = collect_report(str(filtered))
    rows = index_rows(filtered)
    # drops by reason: the dead letters, which match the manifest
    assert {r["reason"]: r["count"] for r in rep.drops.iter_rows(named=True)} == c["dropped"]
    # score distributions: every scored sample of the index, and the kept ones
    stats = {r["reward"]: r for r in rep.score_stats.iter_rows(named=True)}
    for name in REWARDS:
        scored = [r[f"score_{name}"] for r in rows if r[f"score_{name}"] is not None]
        kept = [r[f"score_{name}"] for r in rows if r["kept"]]
        assert (stats[name]["n"], stats[name]["min"], stats[name]["max"]) == (len(scored), min(scored), max(scored))
        assert stats[name]["n_kept"] == len(kept) == c["written"] and stats[name]["kept_min"] == min(kept)
    # reward agreement: Kendall tau-b over every scored sample, kept and dropped
    scored = [r for r in rows if r["score_brisque"] is not None]
    assert len(scored) > c["written"]  # dropped samples with scores take part
    expected = scipy.stats.kendalltau([r["score_brisque"] for r in scored],
                                      [r["score_colourfulness"] for r in scored]).statistic
    got = rep.agreement.filter(rep.agreement["reward"] == "brisque")["colourfulness"].item()
    assert got == pytest.approx(expected)

    html = report.read_text(encoding="utf-8")
    assert "<h1>synpref filter report</h1>" in html and 'src="http' not in html and "<script" not in html
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    kept_keys = sorted(r["key"] for r in rows if r["kept"])
    kept_section = html.split("<h2>Kept samples", 1)[1].split("<h2>Dropped samples", 1)[0]
    assert len(re.findall(r'<img class="thumb" alt="[^"]+" src="data:image/', kept_section)) == len(kept_keys)
    for key in kept_keys:
        assert f'alt="{key}"' in kept_section
    assert "a photograph: astronaut" in kept_section  # captions are shown
    # histograms: one per reward, the threshold and the top-fraction cutoff marked where they are
    assert html.count("<svg") == len(REWARDS)
    marks = re.findall(r'<line class="cutoff" data-value="([^"]+)"', html)
    assert sorted(float(v) for v in marks) == pytest.approx(sorted([-40.0, manifest["top_fraction_cutoff"]]))
    # dropped samples: a section per reason; a readable image is shown, an unreadable one says why
    dropped = html.split("<h2>Dropped samples", 1)[1]
    for reason in c["dropped"]:
        assert f"<h3>{reason}</h3>" in dropped
    blurred = dropped.split("<h3>below_threshold</h3>", 1)[1].split("<h3>", 1)[0]
    assert 'alt="000000005" src="data:image/jpeg;base64,' in blurred  # the blurred astronaut, read from the input
    not_image = dropped.split("<h3>not_an_image</h3>", 1)[1].split("<h3>", 1)[0]
    assert "<img" not in not_image and "not_an_image" in not_image


def test_inspect_names_truncated_and_missing_filtered_tars(filtered, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(filtered, copy)
    shards = sorted((copy / "shards").glob("*.tar"))
    bad, gone = shards[0], shards[-1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    gone.unlink()
    assert main(["inspect", str(copy), "--html", str(tmp_path / "copy.html")]) == 1
    text = capsys.readouterr().out
    assert "verify: PROBLEMS" in text
    findings = text.split("verify: PROBLEMS", 1)[1]
    assert f"{bad}: unreadable" in findings and "manifest says" in findings
    assert f"{gone}: missing" in findings
    assert str(filtered) + "/" not in findings  # only the folder given is read
    assert str(bad) in (tmp_path / "copy.html").read_text()
    assert main(["inspect", str(filtered), "--no-verify"]) == 0
    manifest = json.loads((copy / "manifest.json").read_text())  # the first version's flat counts
    manifest["counts"] = manifest["counts"]["samples"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["inspect", str(copy)]) == 2
    assert "older synpref filter" in capsys.readouterr().err


def test_kendall_tau_b_matches_a_brute_force_pair_count():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7, 40):
        for trial in range(6):
            x = rng.integers(0, 4, n) if trial % 2 else rng.normal(size=n)  # with and without ties
            y = rng.integers(0, 3, n) if trial % 3 else rng.normal(size=n)
            pairs = list(itertools.combinations(range(n), 2))
            s = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i, j in pairs)
            tx = sum(x[i] != x[j] for i, j in pairs)
            ty = sum(y[i] != y[j] for i, j in pairs)
            expected = s / np.sqrt(tx * ty) if tx and ty else float("nan")
            got = kendall_tau_b(x, y)
            assert (np.isnan(got) and np.isnan(expected)) or got == pytest.approx(expected), (n, trial)
