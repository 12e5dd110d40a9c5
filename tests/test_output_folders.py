"""Output folders that two jobs, a failed run, a tampered shard or a typo cannot corrupt (issue 21, sections 1-4).

Every case runs the ``synpref`` command as a user does, in a subprocess. A lock held by a live process is a
real second process holding ``_synpref.lock`` through the same ``acquire`` a run uses; a stale lock is that
process killed with SIGKILL.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import tiny_build_config
from synpref.runs.beam_flags import unknown_flags
from synpref.runs.output_folder import LOCK_NAME, MARKER_NAME

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "synpref.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=900)


def one_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def hold_lock(folder, command):
    """A live process holding ``folder``'s lock (as a running ``command`` does) until it is killed."""
    code = ("import sys, time; from synpref.runs.output_folder import acquire; acquire(sys.argv[1], sys.argv[2]); "
            "print('locked', flush=True); time.sleep(900)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder), command], stdout=subprocess.PIPE, text=True,
                         env=ENV)
    assert p.stdout.readline().strip() == "locked"
    return p


def kill(p):
    p.kill()
    p.wait()  # reaped: the pid is gone, as after a crash


def write_job(path, cfg) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def png_bytes(seed: int, size: int = 32) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tiny_corpus(root):
    """One img2dataset-style tar shard of three samples."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(3):
            for ext, data in (("png", png_bytes(i)), ("txt", f"pattern {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                import io

                tar.addfile(info, io.BytesIO(data))
    return root


def filter_job(source, out) -> dict:
    return {"input": {"source": [str(source)]}, "rewards": [{"name": "resolution"}],
            "output": {"output_dir": str(out), "samples_per_shard": 2}}


@pytest.fixture(scope="module")
def built(demo_models, tmp_path_factory):
    """A finished tiny build, made by ``synpref build`` after taking over a stale lock of a killed process."""
    root = tmp_path_factory.mktemp("built")
    out = root / "out"
    job = write_job(root / "job.yaml", tiny_build_config(demo_models, out, prompts={"source": "builtin",
                                                                                      "num_prompts": 3}))
    holder = hold_lock(out, "synpref build")
    refused = cli("build", "--config", job, cwd=root)
    left = sorted(os.listdir(out))  # what the refused run left in the folder
    kill(holder)  # now a stale lock: its pid is dead
    proc = cli("build", "--config", job, cwd=root)
    return {"root": root, "out": out, "job": job, "holder": holder, "refused": refused, "left": left, "proc": proc}


# -- 1. one writer per output folder ------------------------------------------------------------------------------

def test_a_build_into_a_locked_folder_is_refused_naming_the_owner_and_a_stale_lock_is_taken_over(built):
    line = one_line(built["refused"])
    assert built["refused"].returncode == 2
    assert f"pid {built['holder'].pid}" in line and "synpref build" in line and "--force-unlock" in line
    assert built["left"] == [LOCK_NAME]  # refused before any work: only the holder's lock is there
    proc = built["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"taking over the lock on {built['out']} left by synpref build (pid {built['holder'].pid}" in proc.stderr
    assert not (built["out"] / LOCK_NAME).exists()  # released at the end
    assert json.loads((built["out"] / MARKER_NAME).read_text())["kind"] == "build"


def test_two_builds_started_together_into_one_folder_one_is_refused(demo_models, tmp_path):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_build_config(demo_models, out, prompts={"source": "builtin",
                                                                                          "num_prompts": 2}))
    cmd = [sys.executable, "-m", "synpref.cli", "build", "--config", job]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=900), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) == [0, 2], [err[-1500:] for _, _, err in results]
    refused = next(err for rc, _, err in results if rc == 2)
    winner = next(p for p, (rc, _, _) in zip(procs, results) if rc == 0)
    assert f"is in use by synpref build (pid {winner.pid} on " in refused
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["prompts"]["written"] == 2


def test_filter_and_train_refuse_a_locked_folder_and_force_unlock_takes_it(demo_models, tmp_path):
    corpus = tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "filtered"
    job = write_job(tmp_path / "filter.yaml", filter_job(corpus, out))
    holder = hold_lock(out, "synpref filter")
    try:
        proc = cli("filter", "--config", job, cwd=tmp_path)
        assert proc.returncode == 2 and f"in use by synpref filter (pid {holder.pid}" in one_line(proc)
        forced = cli("filter", "--config", job, "--force-unlock", cwd=tmp_path)
        assert forced.returncode == 0, forced.stderr[-2000:]
        assert "--force-unlock: removing the lock of synpref filter" in forced.stderr
        assert json.loads((out / "manifest.json").read_text())["counts"]["samples"]["in"] == 3
    finally:
        kill(holder)

    from trainer_fixtures import write_ranked_shard

    shards = tmp_path / "shards"
    shards.mkdir()
    write_ranked_shard(shards / "ranked-00000.tar", [("p0", "a prompt", [0.9, 0.1])], np.random.default_rng(0))
    train_out = tmp_path / "train"
    train_job = write_job(tmp_path / "train.yaml", {"pretrained_model": demo_models["tiny-sd-a"],
                                                    "shards": [str(shards)], "output_dir": str(train_out),
                                                    "max_steps": 1, "resolution": 32})
    holder = hold_lock(train_out, "synpref train")
    try:
        proc = cli("train", "--config", train_job, cwd=tmp_path)
        assert proc.returncode == 2 and f"in use by synpref train (pid {holder.pid}" in one_line(proc)
        assert not (train_out / "train_summary.json").exists()
    finally:
        kill(holder)


# -- 2. exit codes that never lie -----------------------------------------------------------------------------------

def test_a_failed_build_rerun_reports_the_same_problem_and_exit_code(demo_models, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red\x00 apple\nbell\x07 tower\n")  # NUL and BEL: dropped as control_characters
    job = write_job(tmp_path / "job.yaml", tiny_build_config(demo_models, tmp_path / "out",
                                                             prompts={"source": str(prompts)}))
    first, second = (cli("build", "--config", job, cwd=tmp_path) for _ in range(2))
    for proc in (first, second):
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "== synpref build: FAILED ==" in proc.stdout and "up to date" not in proc.stdout
        assert "PROBLEM     no prompt produced a sample" in proc.stdout
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["counts"]["prompts"]["dropped"] == {"control_characters": 2}


def test_flags_beam_does_not_define_are_refused_in_one_line(demo_models, tmp_path):
    job = write_job(tmp_path / "job.yaml", tiny_build_config(demo_models, tmp_path / "out"))
    for flag in (["--num_prompts=3"], ["--tyop", "1"]):
        proc = cli("build", "--config", job, *flag, cwd=tmp_path)
        assert proc.returncode == 2 and flag[0] in one_line(proc)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    corpus = tiny_corpus(tmp_path / "corpus")
    proc = cli("filter", "--config", write_job(tmp_path / "f.yaml", filter_job(corpus, tmp_path / "f")), "--tyop=1",
               cwd=tmp_path)
    assert proc.returncode == 2 and "--tyop=1" in one_line(proc)


@pytest.mark.parametrize("flags", [
    ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
    ["--direct_running_mode", "multi_processing", "--direct_num_workers=2"],
    ["--runner=DataflowRunner", "--project", "p", "--region", "europe-west4", "--temp_location", "gs://b/tmp",
     "--setup_file", "./setup.py", "--experiments=use_runner_v2"],
    ["--runner=FlinkRunner", "--flink_master=localhost:8081"],
    ["--save_main_session", "--sdk_container_image=img"],
])
def test_beam_and_runner_options_pass(flags):
    assert unknown_flags(flags) == []


def test_eval_rewards_with_no_usable_pair_is_exit_1_in_one_line(demo_models, tmp_path):
    job = write_job(tmp_path / "job.yaml", tiny_build_config(demo_models, tmp_path / "out",
                                                             rewards=[{"name": "sharpness"}]))
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64())])
    pq.write_table(pa.Table.from_pylist([], schema=schema), tmp_path / "empty.parquet")
    pq.write_table(pa.Table.from_pylist([{"caption": "a", "jpg_0": png_bytes(0), "jpg_1": png_bytes(1),
                                          "label_0": 0.5}], schema=schema), tmp_path / "ties.parquet")
    for name in ("empty.parquet", "ties.parquet"):
        proc = cli("eval-rewards", "--config", job, "--pairs", tmp_path / name, "--json", tmp_path / "r.json",
                   cwd=tmp_path)
        assert proc.returncode == 1 and "no pair in" in one_line(proc) and "nan" not in proc.stdout
    assert not (tmp_path / "r.json").exists()


def test_every_json_written_is_strict():
    from synpref.core.fileio import dumps_strict

    with pytest.raises(ValueError):
        dumps_strict({"guidance_scale": float("nan")})


# -- 3. checks that check contents ----------------------------------------------------------------------------------

def test_a_shard_edited_in_place_is_found_by_inspect_and_rewritten_by_a_resumed_build(built, tmp_path):
    out = built["out"]
    tar = out / "ranked/ranked-00000.tar"
    original = tar.read_bytes()
    data = bytearray(original)
    at = data.index(b'"phi":') + len(b'"phi":')
    digit = next(i for i in range(at, at + 30) if chr(data[i]).isdigit() and data[i] != ord("9") and i > at + 2)
    data[digit] = ord("9")  # e.g. 0.67 -> 0.97: same size, other bytes
    tar.write_bytes(bytes(data))
    assert tar.stat().st_size == len(original)

    proc = cli("inspect", out, cwd=built["root"])
    assert proc.returncode == 1
    assert re.search(rf"{re.escape(str(tar))}: content changed since it was written", proc.stdout), proc.stdout

    rebuilt = cli("build", "--config", built["job"], cwd=built["root"])
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert "up to date" not in rebuilt.stdout and "1 shard(s) changed on disk" in rebuilt.stdout
    assert tar.read_bytes() == original
    assert cli("inspect", out, cwd=built["root"]).returncode == 0
    stats = json.loads((out / "_stats/shard-00000.json").read_text())
    assert stats["sha256"]["ranked_tar"] == hashlib.sha256(original).hexdigest()


# -- 4. folders the user did not give us ----------------------------------------------------------------------------

def test_a_folder_that_is_not_a_synpref_output_is_refused_untouched(demo_models, built, tmp_path):
    out = tmp_path / "mine"
    (out / "ranked").mkdir(parents=True)
    (out / "README.md").write_text("my notes")
    (out / "manifest.json").write_text("{}")
    (out / "ranked/ranked-00000.tar").write_bytes(b"not ours")
    before = files(out)
    job = write_job(tmp_path / "job.yaml", tiny_build_config(demo_models, out))
    proc = cli("build", "--config", job, cwd=tmp_path)
    assert proc.returncode == 2 and "is not empty" in one_line(proc)
    assert files(out) == before

    corpus = tiny_corpus(tmp_path / "corpus")  # a filter into a build's folder: another kind
    proc = cli("filter", "--config", write_job(tmp_path / "f.yaml", filter_job(corpus, built["out"])), cwd=tmp_path)
    assert proc.returncode == 2 and "holds a synpref build output, not a filter output" in one_line(proc)


def test_stale_file_cleanup_only_touches_files_synpref_writes(built):
    out = built["out"]
    keep = {out / "ranked/notes.txt": b"mine", out / "my.tar": b"also mine"}
    for path, data in keep.items():
        path.write_bytes(data)
    stale = out / "pairs/pairs-00099.tar"  # named as synpref names shards: an earlier, larger run's
    stale.write_bytes(b"old")
    shutil.copy(out / "manifest.json", out / "manifest.keep")
    (out / "manifest.json").unlink()  # not finished: the rerun runs and sweeps
    proc = cli("build", "--config", built["job"], cwd=built["root"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not stale.exists() and all(p.read_bytes() == d for p, d in keep.items())


@pytest.mark.parametrize("command", ["build", "filter", "train"])
def test_an_empty_output_location_is_a_config_error(demo_models, tmp_path, command):
    corpus = tiny_corpus(tmp_path / "corpus")
    cfg = {"build": tiny_build_config(demo_models, tmp_path / "out"), "filter": filter_job(corpus, tmp_path / "out"),
           "train": {"pretrained_model": demo_models["tiny-sd-a"], "shards": [str(corpus)],
                     "output_dir": str(tmp_path / "out")}}[command]
    key = "output_dir" if command == "train" else "output.output_dir"
    proc = cli(command, "--config", write_job(tmp_path / "job.yaml", cfg), "--set", f"{key}=", cwd=tmp_path)
    assert proc.returncode == 2 and "output_dir" in one_line(proc)
    assert not (tmp_path / "None").exists() and sorted(os.listdir(tmp_path)) == ["corpus", "job.yaml"]


def test_the_lock_on_an_fsspec_store_uses_its_conditional_create():
    """memory:// goes through ``pipe_file(mode="create")``, the call gcsfs and s3fs make atomic."""
    from synpref.runs.errors import RunRefused
    from synpref.runs.output_folder import acquire, locked_output, release

    with locked_output("memory://bucket/run", "synpref build") as owner:
        assert json.loads(fsspec_cat(f"memory://bucket/run/{LOCK_NAME}"))["token"] == owner["token"]
        with pytest.raises(RunRefused, match=rf"in use by synpref build \(pid {os.getpid()} on "):
            acquire("memory://bucket/run", "synpref filter")
    assert not fsspec_exists(f"memory://bucket/run/{LOCK_NAME}")
    forced = acquire("memory://bucket/run2", "synpref build")
    taken = acquire("memory://bucket/run2", "synpref train", force_unlock=True)
    release("memory://bucket/run2", forced)  # no longer ours: left alone
    assert json.loads(fsspec_cat(f"memory://bucket/run2/{LOCK_NAME}"))["token"] == taken["token"]


def fsspec_cat(url):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


def fsspec_exists(url):
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)
