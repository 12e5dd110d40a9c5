"""Ensemble scoring: shared preprocessing computed once, one reward's failure costs only its scores, groups."""
import glob
import json
from typing import Sequence

import numpy as np
from PIL import Image

from conftest import tiny_build_config
from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
from synpref.transforms.rewards import Reward, create_reward, register_reward
from synpref.transforms.scoring import score_ensemble
from test_build_e2e import digests

CALLS = {"preprocess": 0}


@register_reward("test_mean_red")
class MeanRed(Reward):
    """Mean red value of a shared 8x8 thumbnail."""

    def preprocess_key(self):
        return ("thumb", 8)

    def preprocess(self, images):
        CALLS["preprocess"] += 1
        return np.stack([np.asarray(im.resize((8, 8)), dtype=np.float64) for im in images])

    def score_preprocessed(self, pixels, prompts):
        return list(pixels[..., 0].mean(axis=(1, 2)))


@register_reward("test_mean_green")
class MeanGreen(MeanRed):
    def score_preprocessed(self, pixels, prompts):
        return list(pixels[..., 1].mean(axis=(1, 2)))


@register_reward("test_broken")
class Broken(Reward):
    def score_batch(self, images, prompts: Sequence[str]):
        raise RuntimeError("CUDA out of memory\nsecond line")


def test_rewards_with_one_preprocess_key_share_one_preprocessing_and_a_failure_stays_local():
    images = [Image.new("RGB", (16, 16), (200, 10, 0)), Image.new("RGB", (16, 16), (0, 100, 50))]
    rewards = [create_reward(n) for n in ("test_mean_red", "test_broken", "test_mean_green")]
    CALLS["preprocess"] = 0
    out = score_ensemble(rewards, images, ["a", "b"])
    assert CALLS["preprocess"] == 1
    assert out["test_mean_red"] == [200.0, 0.0] and out["test_mean_green"] == [10.0, 100.0]
    assert out["test_broken"] == "RuntimeError: CUDA out of memory second line"


def test_reward_groups_give_the_same_shards_as_one_ensemble(demo_models, tmp_path):
    one = tiny_build_config(demo_models, tmp_path / "one")
    split = tiny_build_config(demo_models, tmp_path / "split")
    split["rewards"] = [dict(r, group=f"g{i % 2}") for i, r in enumerate(split["rewards"])]
    build(build_config_from_dict(one))
    result = build(build_config_from_dict(split))
    assert digests(tmp_path / "one") == digests(tmp_path / "split")
    assert {"score:clip_score", "score:jpeg_compressibility", "score:sharpness"} <= set(
        result["summary"]["stage_busy_seconds"])


def test_a_reward_that_always_fails_fails_the_run_with_its_name(demo_models, tmp_path):
    cfg = tiny_build_config(demo_models, tmp_path / "out")
    cfg["rewards"].append({"name": "test_broken"})
    result = build(build_config_from_dict(cfg))
    assert result["summary"]["problems"] == [
        "no prompt produced a sample: see the dropped counts above and dead_letter/",
        "reward test_broken: 24 of 24 images failed (max_error_share 0.1); first: scoring_error: "
        + sorted(json.loads(line)["record_id"] for f in glob.glob(f"{tmp_path}/out/dead_letter/*.jsonl")
                 for line in open(f))[0] + ": RuntimeError: CUDA out of memory second line"]


def test_rewards_shared_across_processes_give_the_same_shards(demo_models, tmp_path):
    """model_copies: 1 puts the ensemble in one process per machine behind a proxy (methods only)."""
    one = tiny_build_config(demo_models, tmp_path / "one")
    shared = tiny_build_config(demo_models, tmp_path / "shared")
    shared["rewards"] = [dict(r, model_copies=1) for r in shared["rewards"]]
    build(build_config_from_dict(one))
    result = build(build_config_from_dict(shared))
    assert not result["summary"]["problems"]
    assert digests(tmp_path / "one") == digests(tmp_path / "shared")
