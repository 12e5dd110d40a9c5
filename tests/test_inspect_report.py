"""``synpref inspect``: checks the folder it is given, summary tables, and the self-contained HTML report."""
import html
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from synpref.reporting.inspect_build import collect_report, kendall_tau_b


@pytest.fixture(scope="module")
def tiny_build(demo_models, tmp_path_factory):
    from conftest import tiny_build_config

    from synpref.pipelines.build_preferences import build
    from synpref.schemas.config import build_config_from_dict

    out = tmp_path_factory.mktemp("inspect") / "build"
    build(build_config_from_dict(tiny_build_config(demo_models, out)))
    return out


def inspect(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "synpref.cli", "inspect", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_html_report_is_self_contained_and_shows_every_prompt_and_reward(tiny_build, tmp_path):
    report_path = tmp_path / "report.html"
    proc = inspect(tiny_build, "--samples", "3", "--html", report_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verify: OK, every shard re-read matches the manifest" in proc.stdout
    assert f"html report: {report_path}" in proc.stdout
    assert "drops by reason" in proc.stdout and "reward agreement" in proc.stdout
    text = report_path.read_text(encoding="utf-8")
    assert 'src="http' not in text and "<link" not in text and "<script" not in text and "url(" not in text
    assert not re.search(r"""(src|href)=["'](?!data:)""", text)  # every src / href is an embedded data: URI

    rep = collect_report(str(tiny_build), samples=3)
    assert len(rep.samples) == 3
    for s in rep.samples:
        assert f'<h3 class="prompt">{html.escape(s["json"]["prompt"], quote=True)}</h3>' in text
    for reward in rep.rewards:
        assert reward in text and f"<h3>{reward}</h3>" in text  # its histogram
    shown = sum(len(s["json"]["candidates"]) for s in rep.samples)
    embedded = re.findall(r'<img [^>]*src="data:image/(?:png|jpeg);base64,', text)
    assert len(embedded) == shown == 12
    assert text.count("<svg") == len(rep.rewards)

    for reward in rep.rewards:  # the agreement table: a reward agrees with itself
        cell = re.search(rf'data-a="{reward}" data-b="{reward}" data-tau="([^"]+)"', text)
        assert cell and float(cell.group(1)) == 1.0
    assert len(rep.agreement_groups) == len(rep.rewards)
    # drops by reason come from dead_letter/ and match the manifest's counts
    by_reason = {(r["level"], r["reason"]): r["count"] for r in rep.drops.iter_rows(named=True)}
    assert by_reason[("prompt", "not_sampled")] == rep.manifest["counts"]["prompts"]["dropped"]["not_sampled"] == 58
    stats = {r["reward"]: r for r in rep.score_stats.iter_rows(named=True)}
    assert all(stats[r]["n"] == 24 and stats[r]["min"] <= stats[r]["median"] <= stats[r]["max"] for r in rep.rewards)


def test_agreement_is_mean_kendall_tau_within_prompts(tiny_build):
    rep = collect_report(str(tiny_build), samples=0, verify_shards=False)
    a, b = rep.rewards[:2]
    taus = [kendall_tau_b(g[a].to_numpy(), g[b].to_numpy()) for _, g in rep.scores.group_by("prompt_id")]
    expected = np.nanmean(taus)
    got = rep.agreement.filter(rep.agreement["reward"] == a)[b].item()
    assert got == pytest.approx(expected)
    for r in rep.rewards:
        assert rep.agreement.filter(rep.agreement["reward"] == r)[r].item() == pytest.approx(1.0)
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0 and np.isnan(kendall_tau_b([1, 1, 1], [1, 2, 3]))
    assert kendall_tau_b([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(5 / np.sqrt(30))  # tau-b: 5 concordant, 1 tie in x


def test_inspect_checks_the_folder_it_is_given(tiny_build, tmp_path):
    """A copy with a truncated tar reports that file (no traceback, exit 1); the original still verifies."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_build, copy)
    bad = copy / "ranked" / "ranked-00001.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (copy / "pairs" / "pairs-00000.tar").unlink()

    proc = inspect(copy, "--html", tmp_path / "copy.html", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr + proc.stdout
    assert "verify: PROBLEMS" in proc.stdout
    findings = proc.stdout.split("verify: PROBLEMS", 1)[1]
    assert f"{bad}: unreadable" in findings and "manifest says" in findings
    assert f"{copy}/pairs/pairs-00000.tar: missing" in findings
    assert str(tiny_build) + "/" not in findings  # the manifest's stored paths point at the original: unused
    assert str(bad) in (tmp_path / "copy.html").read_text()

    ok = inspect(tiny_build, cwd=tmp_path)
    assert ok.returncode == 0 and "verify: OK, every shard re-read matches the manifest" in ok.stdout
