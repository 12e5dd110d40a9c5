"""Reruns never serve stale data: a rerun with a changed config writes exactly what a fresh run writes.

Each test copies one finished build (staging kept), changes one thing, reruns into the copy,
and compares every shard and index byte with a fresh build of the changed config.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import webdataset as wds
import yaml

from conftest import tiny_build_config
from synpref.pipelines.build_preferences import build
from synpref.schemas.config import BuildConfig, build_config_from_dict
from conftest import digests

KEEP = {"samples_per_shard": 4, "staging": "keep"}


def run(models, out, **overrides):
    cfg = tiny_build_config(models, out, **overrides)
    cfg["output"] = {"output_dir": str(out), **KEEP}
    return build(build_config_from_dict(cfg))


@pytest.fixture(scope="module")
def base(demo_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "out"
    return out, run(demo_models, out)


def rerun_equals_fresh(models, base_dir, tmp_path, **overrides):
    """Rerun into a copy of the base build and build fresh; return both results after comparing bytes."""
    again = tmp_path / "again"
    shutil.copytree(base_dir, again)
    rerun = run(models, again, **overrides)
    fresh = run(models, tmp_path / "fresh", **overrides)
    assert digests(again) == digests(tmp_path / "fresh")
    assert rerun["manifest"]["counts"] == fresh["manifest"]["counts"]
    assert not rerun["summary"]["problems"]
    return rerun, fresh


def ranked_meta(out):
    return [json.loads(s["json"]) for s in wds.WebDataset(sorted(glob.glob(f"{out}/ranked/*.tar")),
                                                             shardshuffle=False)]


def test_changed_seed_rewrites_every_shard(demo_models, base, tmp_path):
    rerun, _ = rerun_equals_fresh(demo_models, base[0], tmp_path, seed=1)
    assert digests(tmp_path / "again") != digests(base[0])
    assert rerun["summary"]["counters"].get("shards_skipped", 0) == 0
    assert rerun["summary"]["counters"].get("images_reused", 0) == 0  # seed 1 images are new keys


def test_changed_filter_rewrites_shards_but_reuses_images(demo_models, base, tmp_path):
    rerun, _ = rerun_equals_fresh(demo_models, base[0], tmp_path, filter={"require_unanimous": True})
    counters = rerun["summary"]["counters"]
    assert counters["images_reused"] == 24 and counters.get("images_generated", 0) == 0
    assert rerun["manifest"]["counts"]["pairs"]["balanced"]
    for s in wds.WebDataset(sorted(glob.glob(f"{tmp_path}/again/pairs/*.tar")), shardshuffle=False):
        assert json.loads(s["json"])["agreement"] == 1.0


def test_changed_steps_and_scheduler_regenerate_instead_of_reusing(demo_models, base, tmp_path):
    cfg = tiny_build_config(demo_models, "x")
    gens = [dict(g, num_inference_steps=3, scheduler="DDIMScheduler") for g in cfg["generators"]]
    rerun, _ = rerun_equals_fresh(demo_models, base[0], tmp_path, generators=gens)
    assert rerun["summary"]["counters"].get("images_reused", 0) == 0
    assert rerun["summary"]["counters"]["images_generated"] == 24
    for meta in ranked_meta(tmp_path / "again"):
        for c in meta["candidates"]:
            assert (c["lineage"]["num_inference_steps"], c["lineage"]["scheduler"]) == (3, "DDIMScheduler")


def test_replaced_model_weights_are_noticed(demo_models, base, tmp_path):
    """Same path, different weights: the content key includes the model's files."""
    from diffusers import UNet2DConditionModel
    import torch

    models = dict(demo_models)
    models["tiny-sd-a"] = str(tmp_path / "sd-a")
    shutil.copytree(demo_models["tiny-sd-a"], models["tiny-sd-a"])
    again = tmp_path / "again"
    shutil.copytree(base[0], again)
    run(models, again)  # a new model path is a new identity: generator a's images are generated once ...
    assert run(models, again)["summary"]["counters"].get("images_generated", 0) == 0  # ... then reused
    unet = UNet2DConditionModel.from_pretrained(models["tiny-sd-a"], subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)
    unet.save_pretrained(f"{models['tiny-sd-a']}/unet")
    # ... then new weights under the same path: generator a's 12 images are regenerated.
    second = run(models, again)
    assert second["summary"]["counters"]["images_generated"] == 12
    assert second["summary"]["counters"]["images_reused"] == 12


def test_fewer_prompts_remove_the_extra_shards(demo_models, base, tmp_path):
    rerun_equals_fresh(demo_models, base[0], tmp_path, prompts={"source": "builtin", "num_prompts": 3})
    assert sorted(os.listdir(tmp_path / "again" / "ranked")) == ["ranked-00000.parquet", "ranked-00000.tar"]
    assert sorted(os.listdir(tmp_path / "again" / "_stats")) == ["shard-00000.json"]


def test_same_config_is_up_to_date_and_runs_nothing(demo_models, base, tmp_path):
    again = tmp_path / "again"
    shutil.copytree(base[0], again)
    rerun = run(demo_models, again)
    assert rerun["summary"]["up_to_date"] and rerun["summary"]["counters"] == {}
    assert digests(again) == digests(base[0])
    os.remove(again / "ranked" / "ranked-00001.parquet")  # a missing file: not up to date any more
    rerun = run(demo_models, again)
    assert "up_to_date" not in rerun["summary"]
    assert rerun["summary"]["counters"]["shards_skipped"] == 1  # shard 0 provably intact, shard 1 rewritten
    assert rerun["summary"]["counters"].get("images_generated", 0) == 0
    assert digests(again) == digests(base[0])


def test_changed_prompt_file_is_not_up_to_date(demo_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\ntwo green apples\n")
    cfg = tiny_build_config(demo_models, tmp_path / "out", prompts={"source": str(prompts)})
    first = build(build_config_from_dict(cfg))
    assert not os.path.exists(tmp_path / "out" / "_staging")  # default policy: removed after a clean run
    assert build(build_config_from_dict(cfg))["summary"]["up_to_date"]
    prompts.write_text("a red cube\nthree blue birds\n")
    second = build(build_config_from_dict(cfg))
    assert "up_to_date" not in second["summary"]
    assert {m["prompt"] for m in ranked_meta(tmp_path / "out")} == {"a red cube", "three blue birds"}
    assert first["manifest"]["run_fingerprint"] != second["manifest"]["run_fingerprint"]


def test_a_generator_failing_every_call_fails_the_run(demo_models, tmp_path):
    """Height 60 passes no diffusers call. Validation refuses it; bypassed here to test the runtime guard."""
    cfg = BuildConfig.from_dict(tiny_build_config(demo_models, tmp_path / "out"))
    bad = cfg.generators[1].model_copy(update={"height": 60})  # model_copy does not validate
    result = build(cfg.model_copy(update={"generators": (cfg.generators[0], bad)}))
    problems = result["summary"]["problems"]
    assert len(problems) == 1 and problems[0].startswith("generator tiny-sd-b: 12 of 12 images failed")
    drops = [json.loads(line) for f in glob.glob(f"{tmp_path}/out/dead_letter/*.jsonl") for line in open(f)]
    errors = [d for d in drops if d["reason"] == "generation_error"]
    assert len(errors) == 12
    for d in errors:
        assert "\n" not in d["detail"] and len(d["detail"]) <= 300
        assert d["detail"].startswith("ValueError: `height` and `width` have to be divisible by 8")
    assert os.path.isdir(f"{tmp_path}/out/_staging")  # kept: a failed run may be rerun


def test_an_unbalanced_or_empty_run_is_a_problem():
    from synpref.runs.health import build_problems as health_problems

    cfg = build_config_from_dict(tiny_build_config({"tiny-sd-a": "a/b", "tiny-sd-b": "a/c", "clip": {}}, "o"))
    level = {"in": 4, "written": 3, "dropped": {}, "dropped_total": 0, "balanced": False}
    ok = {"in": 0, "written": 0, "dropped": {}, "dropped_total": 0, "balanced": True}
    problems = health_problems({"counts": {"prompts": ok, "candidates": ok, "pairs": level}}, cfg)
    assert problems == ["ledger does not balance for pairs: in 4 != written 3 + dropped 0",
                        "no prompt produced a sample: see the dropped counts above and dead_letter/"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["generating", "writing"])
def test_sigkill_then_rerun_equals_an_uninterrupted_run(demo_models, base, tmp_path, kill_when):
    """``synpref build`` killed with SIGKILL mid-generation or mid-writing, then rerun: same bytes."""
    out = tmp_path / "killed"
    cfg = tiny_build_config(demo_models, out)
    cfg["output"] = {"output_dir": str(out), **KEEP}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "synpref.cli", "build", "--config", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pattern = f"{out}/_staging/*/*.json" if kill_when == "generating" else f"{out}/ranked/*.tar*"
    deadline = time.monotonic() + 240
    while not glob.glob(pattern) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert digests(out) == digests(base[0])
