"""``synpref filter`` resume: a rerun after SIGKILL (during scoring, or during writing) scores only what was not
scored and ends byte-identical to an uninterrupted run; a changed scoring setting never reuses cached scores;
changed thresholds reuse them.

Scoring is observed through ``test_logged_mean``: a real reward (mean of the image's pixels, slowed down so a
kill lands mid-run) that appends one line per image it scores to the file named by SYNPREF_TEST_SCORE_LOG,
so the count works across the killed subprocess and the rerun. Writing is observed the same way through
``test_logged_tar``: the tar source, whose image reader (the writer's only way to the original bytes) appends
one line per image read to SYNPREF_TEST_READ_LOG and sleeps SYNPREF_TEST_READ_DELAY seconds first.
Each test prints its redo figures (``pytest -s``; docs/benchmarks.md).
"""
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import time
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq
import yaml

from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from synpref.transforms.corpus_sources import TarSource, register_source
from synpref.transforms.rewards import Reward, register_reward
from test_filter_corpus import HTML, add, all_files, generated, sample

SHARDS, PER_SHARD, CHUNK = 4, 6, 2


@register_reward("test_logged_mean")
class LoggedMean(Reward):
    def __init__(self, delay: float = 0.0, scale: float = 1.0):
        self.delay, self.scale = delay, scale

    def params(self):
        return {"delay": self.delay, "scale": self.scale}

    def score_batch(self, images, prompts: Sequence[str]):
        time.sleep(self.delay)
        with open(os.environ["SYNPREF_TEST_SCORE_LOG"], "a") as f:
            f.write("x\n" * len(images))
        return [self.scale * float(np.asarray(im, dtype=np.float64).mean()) for im in images]


@register_source("test_logged_tar")
class LoggedTar(TarSource):
    suffixes = (".tar",)

    def open_images(self, url: str):
        reader = super().open_images(url)
        read = reader.read

        def logged(member: str, offset: int, size: int) -> bytes:
            time.sleep(float(os.environ.get("SYNPREF_TEST_READ_DELAY", "0")))
            with open(os.environ["SYNPREF_TEST_READ_LOG"], "a") as f:
                f.write("x\n")
            return read(member, offset, size)
        reader.read = logged
        return reader


def replace_member(tar_path: pathlib.Path, member: str, data: bytes) -> None:
    """Rewrite a tar with new bytes under one member name (same key, same name: only the content changes)."""
    with tarfile.open(tar_path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar_path, "w") as t:
        for name, old in members:
            add(t, name, data if name == member else old)


def make_corpus(root: pathlib.Path) -> int:
    """SHARDS tars of PER_SHARD samples; one HTML page per shard (dropped at decode). Returns the scorable count."""
    root.mkdir()
    for s in range(SHARDS):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for j in range(PER_SHARD):
                image = HTML if j == 3 else generated(s * PER_SHARD + j)
                for name, data in sample(f"k{s}{j}", image, f"caption {s} {j}".encode()):
                    add(tar, name, data)
    return SHARDS * PER_SHARD


def config(source, out, delay=0.0, scale=1.0, threshold=0.0) -> dict:
    return {"input": {"source": [str(source)], "batch_size": CHUNK},
            "rewards": [{"name": "test_logged_mean", "params": {"delay": delay, "scale": scale}}],
            "filter": {"thresholds": [{"reward": "test_logged_mean", "min": threshold}]},
            "output": {"output_dir": str(out), "samples_per_shard": 4}}


def scored(log: pathlib.Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def cli(cfg_path: pathlib.Path, log: pathlib.Path, read_log: pathlib.Path = None,
        read_delay: float = 0.0) -> subprocess.Popen:
    code = ("import sys; sys.path.insert(0, 'tests'); import test_filter_resume; from synpref.cli import main; "
            f"sys.exit(main(['filter', '--config', {str(cfg_path)!r}]))")
    env = {**os.environ, "SYNPREF_TEST_SCORE_LOG": str(log), "SYNPREF_TEST_READ_DELAY": str(read_delay),
           "SYNPREF_TEST_READ_LOG": str(read_log or log.with_suffix(".reads"))}
    return subprocess.Popen([sys.executable, "-c", code], cwd=pathlib.Path(__file__).parent.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_rerun_after_sigkill_scores_only_the_rest_and_writes_the_same_bytes(tmp_path):
    n = make_corpus(tmp_path / "in")
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path / "in", killed, delay=0.4)))
    proc = cli(cfg_path, tmp_path / "log1")
    deadline = time.monotonic() + 120
    while len(list(killed.glob("_cache/*/*.parquet"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    cached = len(list(killed.glob("_cache/*/*.parquet")))
    assert cached >= 2 and not (killed / "manifest.json").exists()  # killed mid-scoring
    chunks = SHARDS * PER_SHARD // CHUNK
    assert cached < chunks

    done = sum(1 for p in killed.glob("_cache/*/*.parquet") for r in pq.read_table(p).to_pylist()
               if r["drop_reason"] is None)  # samples the killed run scored and cached (HTML pages never score)
    assert done >= 2

    rerun = cli(cfg_path, tmp_path / "log2")
    assert rerun.wait(timeout=300) == 0
    assert scored(tmp_path / "log2") == n - SHARDS - done  # exactly what was not cached, once

    fresh_cfg = tmp_path / "fresh.yaml"
    fresh_cfg.write_text(yaml.safe_dump(config(tmp_path / "in", fresh, delay=0.4)))
    assert cli(fresh_cfg, tmp_path / "log3").wait(timeout=300) == 0
    assert scored(tmp_path / "log3") == n - SHARDS
    a, b = all_files(killed), all_files(fresh)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    print(f"\nfigures: SIGKILL during scoring: {done} of {n - SHARDS} samples scored and cached before the kill; "
          f"the rerun scored {scored(tmp_path / 'log2')} = the other {n - SHARDS - done}, re-scored 0; "
          "same bytes as an uninterrupted run")


def test_a_rerun_after_sigkill_during_writing_scores_nothing_again_and_writes_the_same_bytes(tmp_path):
    n = make_corpus(tmp_path / "in")
    kept = n - SHARDS  # the HTML pages are dropped; threshold 0 keeps every image
    tars = SHARDS * -(-(PER_SHARD - 1) // 4)  # samples_per_shard 4: per input shard ceil(5 / 4) tars
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump({**config(tmp_path / "in", killed), "input": {
        "source": [str(tmp_path / "in")], "batch_size": CHUNK, "format": "test_logged_tar"}}))
    proc = cli(cfg_path, tmp_path / "log1", tmp_path / "reads1", read_delay=0.3)  # a tar of 4: over a second
    deadline = time.monotonic() + 300
    while not list(killed.glob("shards/filtered-*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in killed.glob("shards/filtered-*.tar"))
    assert not (killed / "manifest.json").exists() and 1 <= len(finished) < tars  # killed mid-writing
    assert scored(tmp_path / "log1") == kept  # every sample was scored (and cached) before writing began
    read_before = scored(tmp_path / "reads1")

    rerun = cli(cfg_path, tmp_path / "log2", tmp_path / "reads2")
    assert rerun.wait(timeout=300) == 0
    assert scored(tmp_path / "log2") == 0  # nothing scored again
    assert scored(tmp_path / "reads2") == kept  # the writer does not resume: every tar is written again

    fresh_cfg = tmp_path / "fresh.yaml"
    fresh_cfg.write_text(yaml.safe_dump({**config(tmp_path / "in", fresh), "input": {
        "source": [str(tmp_path / "in")], "batch_size": CHUNK, "format": "test_logged_tar"}}))
    assert cli(fresh_cfg, tmp_path / "log3", tmp_path / "reads3").wait(timeout=300) == 0
    a, b = all_files(killed), all_files(fresh)
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []
    print(f"\nfigures: SIGKILL during writing: {len(finished)} of {tars} output tars finished and {read_before} of "
          f"{kept} kept images read by the writer before the kill; the rerun scored 0 of {kept} samples again and "
          f"read {scored(tmp_path / 'reads2')} images (rewrote all {tars} tars: redid {read_before} image copies, "
          f"{read_before / kept:.0%} of the writing); same bytes as an uninterrupted run")


def test_changed_scoring_never_reuses_scores_and_changed_thresholds_do(tmp_path, monkeypatch):
    n = make_corpus(tmp_path / "in")
    log = tmp_path / "log"
    monkeypatch.setenv("SYNPREF_TEST_SCORE_LOG", str(log))
    out = tmp_path / "out"
    filter_corpus(filter_config_from_dict(config(tmp_path / "in", out)))
    assert scored(log) == n - SHARDS

    # thresholds are not part of scoring: nothing is scored again, and the output is a fresh run's
    first = scored(log)
    filter_corpus(filter_config_from_dict(config(tmp_path / "in", out, threshold=120.0)))
    assert scored(log) == first
    filter_corpus(filter_config_from_dict(config(tmp_path / "in", tmp_path / "fresh_t", threshold=120.0)))
    assert {k: v for k, v in all_files(out).items() if not k.startswith("_cache/")} == {
        k: v for k, v in all_files(tmp_path / "fresh_t").items() if not k.startswith("_cache/")}

    # a changed reward param changes every score: all scored again, none of the cached ones read
    before = scored(log)
    result = filter_corpus(filter_config_from_dict(config(tmp_path / "in", out, scale=2.0, threshold=120.0)))
    assert scored(log) - before == n - SHARDS
    filter_corpus(filter_config_from_dict(config(tmp_path / "in", tmp_path / "fresh_s", scale=2.0, threshold=120.0)))
    assert {k: v for k, v in all_files(out).items() if not k.startswith("_cache/")} == {
        k: v for k, v in all_files(tmp_path / "fresh_s").items() if not k.startswith("_cache/")}
    assert result["manifest"]["counts"]["samples"]["balanced"]

    # changed image bytes under the same key and name: that sample's chunk is scored again, the rest is not
    replace_member(tmp_path / "in" / "00000.tar", "k00.jpg", generated(99))
    before = scored(log)
    filter_corpus(filter_config_from_dict(config(tmp_path / "in", out, scale=2.0, threshold=120.0)))
    assert scored(log) - before == CHUNK


def cache_names(out: pathlib.Path) -> set[str]:
    return {str(p.relative_to(out / "_cache")) for p in (out / "_cache").rglob("*") if p.is_file()}


def test_a_finished_run_prunes_the_cache_to_the_entries_it_used(tmp_path, monkeypatch):
    """After the manifest, _cache/ holds exactly what a fresh run of the same job writes there (other scoring
    settings, changed input bytes and a killed run's .tmp files are gone; files that are not cache entries
    stay), and a rerun still scores nothing; ``output.prune_cache: false`` keeps everything."""
    make_corpus(tmp_path / "in")
    log, out = tmp_path / "log", tmp_path / "out"
    monkeypatch.setenv("SYNPREF_TEST_SCORE_LOG", str(log))

    def run(out_dir, **kw):
        cfg = config(tmp_path / "in", out_dir, **{k: v for k, v in kw.items() if k != "prune"})
        cfg["output"]["prune_cache"] = kw.get("prune", True)
        return filter_corpus(filter_config_from_dict(cfg))

    run(out)
    first = cache_names(out)
    run(tmp_path / "fresh_1")
    assert first == cache_names(tmp_path / "fresh_1") and len(first) == SHARDS * PER_SHARD // CHUNK
    mine = {"README.txt": b"my notes", "ab/notes.parquet": b"not a cache entry name"}
    for name, data in mine.items():
        (out / "_cache" / name).parent.mkdir(parents=True, exist_ok=True)
        (out / "_cache" / name).write_bytes(data)
    (out / "_cache" / "00").mkdir(exist_ok=True)
    (out / "_cache" / "00" / ("0" * 64 + ".parquet.tmp")).write_bytes(b"half a file from a killed run")

    # another reward param: every old entry is unused and goes; the new ones are a fresh run's
    result = run(out, scale=2.0)
    run(tmp_path / "fresh_2", scale=2.0)
    assert cache_names(out) == cache_names(tmp_path / "fresh_2") | set(mine)
    assert not first & cache_names(out)
    assert result["summary"]["counters"]["cache_entries_pruned"] == len(first) + 1  # + the .tmp
    assert all((out / "_cache" / name).read_bytes() == data for name, data in mine.items())
    before = scored(log)
    run(out, scale=2.0)
    assert scored(log) == before  # resume kept: nothing scored again

    # changed bytes in one chunk: only that chunk's old entry goes
    replace_member(tmp_path / "in" / "00000.tar", "k00.jpg", generated(99))
    previous = cache_names(out)
    run(out, scale=2.0)
    run(tmp_path / "fresh_3", scale=2.0)
    assert cache_names(out) == cache_names(tmp_path / "fresh_3") | set(mine)
    assert len(previous - cache_names(out)) == 1 and len(cache_names(out) - previous) == 1

    # prune_cache: false keeps the entries of another setting
    kept = cache_names(out)
    run(out, prune=False)
    assert kept < cache_names(out) and len(cache_names(out) - kept) == SHARDS * PER_SHARD // CHUNK
