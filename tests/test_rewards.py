"""Rewards: every registered reward honours the interface; hand-checkable values; real checkpoint loading."""
import io

import fsspec
import numpy as np
import pytest
from PIL import Image

from synpref.transforms.rewards import available_rewards, create_reward
from synpref.transforms.rewards.sharpness import laplacian_variance

BUILTIN = ["clip_score", "jpeg_compressibility", "sharpness"]


def images():
    rng = np.random.default_rng(0)
    flat = Image.new("RGB", (64, 64), (120, 30, 200))
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return [flat, noise]


def params_for(name, demo_models):
    return {**demo_models["clip"], "variant": "cosine"} if name == "clip_score" else {}


def test_registry_lists_the_builtin_rewards_and_rejects_unknown_names():
    assert set(BUILTIN) <= set(available_rewards())
    with pytest.raises(ValueError, match="unknown reward 'pickscore_v9'; available: "):
        create_reward("pickscore_v9")


@pytest.mark.parametrize("name", BUILTIN)
def test_every_reward_scores_a_batch_with_one_finite_float_per_image(name, demo_models):
    reward = create_reward(name, params_for(name, demo_models))
    reward.load()
    scores = reward.score_batch(images(), ["a purple square", "static noise"])
    assert len(scores) == 2 and all(isinstance(s, float) and np.isfinite(s) for s in scores)
    assert reward.describe()["name"] == name


def test_jpeg_compressibility_prefers_the_simpler_image():
    reward = create_reward("jpeg_compressibility")
    flat, noise = images()
    buf = io.BytesIO()
    noise.save(buf, format="JPEG", quality=95)
    scores = reward.score_batch([flat, noise], ["", ""])
    assert scores[1] == -buf.tell() / 1000.0  # minus the size in kB, as DDPO
    assert scores[0] > scores[1]


def test_sharpness_is_the_variance_of_the_laplacian():
    # A single white pixel on black: the Laplacian over the 3x3 interior is -4 at the centre
    # and +1 at its 4 neighbours (values in [0, 1]); mean 0, variance (16 + 4) / 9.
    g = np.zeros((5, 5), dtype=np.uint8)
    g[2, 2] = 255
    assert laplacian_variance(Image.fromarray(g).convert("RGB")) == pytest.approx(20 / 9)
    assert laplacian_variance(Image.new("RGB", (8, 8), (9, 9, 9))) == 0.0


def test_clip_score_variants_and_remote_checkpoints(demo_models, tmp_path):
    """The same tiny checkpoint loaded from a local path and from an fsspec URL gives the same scores."""
    local = create_reward("clip_score", {**demo_models["clip"], "variant": "cosine"})
    local.load()
    cos = local.score_batch(images(), ["a purple square", "static noise"])
    assert all(-1 <= c <= 1 for c in cos)

    clipped = create_reward("clip_score", {**demo_models["clip"]})  # paper default: 2.5 * max(cos, 0)
    clipped.load()
    assert clipped.score_batch(images(), ["a purple square", "static noise"]) == pytest.approx(
        [2.5 * max(c, 0.0) for c in cos], abs=1e-6)

    fs = fsspec.filesystem("memory")
    for key in ("checkpoint", "model_config"):
        fs.pipe(f"/clip/{key}/" + demo_models["clip"][key].rsplit("/", 1)[-1],
                open(demo_models["clip"][key], "rb").read())
    remote = create_reward("clip_score", {
        "model": demo_models["clip"]["model"], "variant": "cosine", "cache_dir": str(tmp_path / "cache"),
        "checkpoint": "memory:///clip/checkpoint/" + demo_models["clip"]["checkpoint"].rsplit("/", 1)[-1],
        "model_config": "memory:///clip/model_config/" + demo_models["clip"]["model_config"].rsplit("/", 1)[-1]})
    remote.load()
    assert remote.score_batch(images(), ["a purple square", "static noise"]) == pytest.approx(cos)


def test_clip_score_rejects_conflicting_weights():
    with pytest.raises(ValueError, match="either 'pretrained'"):
        create_reward("clip_score", {"pretrained": "openai", "checkpoint": "/x.pt"})
