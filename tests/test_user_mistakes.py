"""User mistakes on the read-only commands are one line and exit 2, before any work: no traceback."""
import json

import pytest

from synpref.cli import main


@pytest.fixture
def build_like(tmp_path):
    """A folder with a manifest as a finished build writes one (inspect reads nothing more before --html)."""
    out = tmp_path / "build"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"shards": [], "counts": {}}))
    return out


@pytest.mark.parametrize("target", ["folder", "missing_parent/report.html"])
def test_inspect_html_target_that_cannot_be_written_is_one_line_exit_2(build_like, tmp_path, capsys, target):
    (tmp_path / "folder").mkdir()
    html = tmp_path / target
    assert main(["inspect", str(build_like), "--html", str(html)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("synpref inspect: --html") and "Traceback" not in err
    assert not (tmp_path / "missing_parent").exists()


def test_export_of_a_filter_output_is_refused_and_writes_nothing(tmp_path, capsys):
    filtered = tmp_path / "filtered"
    filtered.mkdir()
    (filtered / "manifest.json").write_text(json.dumps({"job": "filter", "input_shards": [], "counts": {}}))
    out = tmp_path / "export"
    assert main(["export", "--format", "pickapic", str(filtered), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a synpref filter output, not a build" in err
    assert not out.exists()
