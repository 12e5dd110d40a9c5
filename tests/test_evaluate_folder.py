"""``synpref evaluate`` keeps its output folder as build and filter do (``runs.pipeline_run.run_job``): a marker
written first, a manifest written last with every file's sha256, an identical finished evaluation not run
again, a changed or half-written file found, a failed run's rerun exiting 1 again, the user's files never
overwritten or deleted, and one job per folder. Expected hashes are computed here from the files."""
import hashlib
import json
import subprocess
import sys

import pyarrow.parquet as pq
import yaml

from synpref.cli import main
from synpref.runs.output_folder import LOCK_NAME, MARKER_NAME
from test_output_folders import ENV, hold_lock, kill
from trainer_fixtures import one_thread  # noqa: F401  (fixture)

SAMPLING = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64)


def eval_job(tmp_path, models, out, num_prompts=2, prompts=None) -> str:
    cfg = {"models": [{"name": "base", "model": models["tiny-sd-a"], **SAMPLING}],
           "prompts": prompts or {"source": "builtin", "num_prompts": num_prompts},
           "seeds_per_prompt": 1, "seed": 3, "judges": [{"name": "sharpness"}], "output_dir": str(out)}
    path = tmp_path / f"eval-{num_prompts}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_marker_first_manifest_last_up_to_date_and_changed_files_found(demo_models, tmp_path, capsys):
    out = tmp_path / "out"
    job = eval_job(tmp_path, demo_models, out)
    assert main(["evaluate", "--config", job]) == 0
    capsys.readouterr()
    assert json.loads((out / MARKER_NAME).read_text())["kind"] == "evaluate" and not (out / LOCK_NAME).exists()
    manifest = json.loads((out / "manifest.json").read_text())
    images = pq.read_table(out / "samples.parquet").column("image").to_pylist()
    assert len(images) == 2 and manifest["problems"] == []
    assert manifest["images"] == {name: sha(out / name) for name in images}
    assert manifest["files"] == {name: sha(out / name) for name in
                                 ("samples.parquet", "dead_letter.jsonl", "summary.json", "report.html")}
    before = {name: (out / name).read_bytes() for name in (*manifest["files"], *images)}

    assert main(["evaluate", "--config", job]) == 0  # identical, finished, intact: nothing to do
    assert "up to date" in capsys.readouterr().out

    samples = out / "samples.parquet"
    samples.write_bytes(samples.read_bytes()[:100])  # half-written (as a copy cut short would leave it)
    assert main(["evaluate", "--config", job]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in before} == before  # rewritten, same bytes

    (out / images[1]).unlink()  # a missing image is found too
    assert main(["evaluate", "--config", job]) == 0
    assert "up to date" not in capsys.readouterr().out and (out / images[1]).read_bytes() == before[images[1]]


def test_a_rerun_with_fewer_prompts_removes_its_stale_images_but_not_the_users_files(demo_models, tmp_path):
    out = tmp_path / "out"
    assert main(["evaluate", "--config", eval_job(tmp_path, demo_models, out, num_prompts=2)]) == 0
    old = set(pq.read_table(out / "samples.parquet").column("image").to_pylist())
    (out / "images/base/my_notes.txt").write_text("mine")
    (out / "notes.md").write_text("mine too")
    assert main(["evaluate", "--config", eval_job(tmp_path, demo_models, out, num_prompts=1)]) == 0
    new = set(pq.read_table(out / "samples.parquet").column("image").to_pylist())
    assert len(new) == 1
    assert {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")} == new
    assert len(old - new) == 1 and not (out / (old - new).pop()).exists()
    assert (out / "images/base/my_notes.txt").read_text() == "mine" and (out / "notes.md").read_text() == "mine too"
    assert json.loads((out / "run_summary.json").read_text())["stale_images_removed"] == 1


def test_a_folder_that_is_not_an_evaluation_is_refused_untouched(demo_models, tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "images/base").mkdir(parents=True)
    (mine / "images/base/0123abcd-0.png").write_bytes(b"my own picture")  # named as evaluate names them
    assert main(["evaluate", "--config", eval_job(tmp_path, demo_models, mine)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("synpref evaluate: ") and "is not empty (images)" in line
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == [
        "images", "images/base", "images/base/0123abcd-0.png"]
    assert (mine / "images/base/0123abcd-0.png").read_bytes() == b"my own picture"

    build_out = tmp_path / "build"
    build_out.mkdir()
    (build_out / MARKER_NAME).write_text(json.dumps({"kind": "build"}))
    assert main(["evaluate", "--config", eval_job(tmp_path, demo_models, build_out)]) == 2
    assert "holds a synpref build output, not an evaluate output" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in build_out.iterdir()) == [MARKER_NAME]


def test_two_jobs_in_one_folder_the_second_is_refused(demo_models, tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out, "synpref evaluate")
    try:
        proc = subprocess.run([sys.executable, "-m", "synpref.cli", "evaluate", "--config",
                               eval_job(tmp_path, demo_models, out)], env=ENV, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 2
        assert f"in use by synpref evaluate (pid {holder.pid}" in one_line(proc.stderr)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, not even the marker
    finally:
        kill(holder)


def test_a_failed_evaluation_exits_1_on_every_rerun_until_it_succeeds(demo_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red\x00 apple\nbell\x07 tower\n")  # NUL and BEL: dropped as control_characters
    out = tmp_path / "out"
    job = eval_job(tmp_path, demo_models, out, prompts={"source": str(prompts)})
    for _ in range(2):
        assert main(["evaluate", "--config", job]) == 1
        text = capsys.readouterr().out
        assert "PROBLEM    no image was scored" in text and "up to date" not in text
    assert json.loads((out / "manifest.json").read_text())["problems"] == ["no image was scored: see dead_letter.jsonl"]
    prompts.write_text("a red apple\na bell tower\n")
    assert main(["evaluate", "--config", job]) == 0
    assert pq.read_table(out / "samples.parquet").num_rows == 2
    assert main(["evaluate", "--config", job]) == 0 and "up to date" in capsys.readouterr().out
