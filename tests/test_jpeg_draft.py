"""``input.jpeg_draft`` for the Hugging Face processor rewards (pickscore, mps, nsfw): JPEGs decoded at the
smallest DCT scale whose short side still covers the processor's resize, then the processor's own resize
and crop. Tiny random models in the real formats; the expected draft-size decode is done here with PIL by
hand, and the drift against full-size decoding is measured per reward.
"""
import io
import math

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from synpref.demo.tiny_models import save_tiny_hf_clip, save_tiny_safety_checker
from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from synpref.transforms.corpus_scoring import draft_side
from synpref.transforms.rewards import create_reward
from test_corpus_sources import images, photo_corpus
from test_mps import release_fusion_state

SIDE = 64  # the tiny processors' shortest_edge and crop


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    """Configs of pickscore, mps and nsfw on tiny models, their processors resizing to SIDE."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("hf-rewards")
    clip = save_tiny_hf_clip(root / "clip", seed=3, side=SIDE)
    state = {f"model.{k}": v for k, v in load_file(f"{clip['model']}/model.safetensors").items()}
    state.update(release_fusion_state(torch.Generator().manual_seed(7)))  # the MPS release's key layout
    save_file(state, str(root / "mps.safetensors"))
    nsfw = save_tiny_safety_checker(root / "checker", seed=4, side=SIDE)
    return [{"name": "pickscore", "params": {**clip, "device": "cpu"}},
            {"name": "mps", "params": {"checkpoint": str(root / "mps.safetensors"), "processor": clip["processor"],
                                       "config": clip["model"], "device": "cpu"}},
            {"name": "nsfw", "params": {**nsfw, "device": "cpu"}}]


def by_hand_draft(data: bytes) -> Image.Image:
    """libjpeg's largest scale-down 1/k (k = 8, 4, 2) that keeps the short side >= SIDE, taken only when the
    image's short side is at least 2 * SIDE (else full size)."""
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    for k in (8, 4, 2):
        if min(w, h) >= 2 * SIDE and math.ceil(min(w, h) / k) >= SIDE:
            im.draft("RGB", (w // k, h // k))  # PIL picks the largest k with size // request >= k
            assert im.size == (math.ceil(w / k), math.ceil(h / k))  # libjpeg rounds scaled sizes up
            break
    return im.convert("RGB")


def test_processor_rewards_report_their_resize_target(rewards, tmp_path):
    loaded = [create_reward(r["name"], r["params"]) for r in rewards]
    assert [r.decode_min_side() for r in loaded] == [SIDE] * 3  # pickscore + mps (new config), nsfw (legacy)
    assert draft_side(loaded) == (SIDE, "")
    assert draft_side(loaded + [create_reward("sharpness")]) == (0, "reward sharpness reads pixels at full resolution")
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    CLIPImageProcessorPil(do_resize=False, crop_size={"height": SIDE, "width": SIDE}).save_pretrained(str(tmp_path))
    no_resize = create_reward("nsfw", {"model": rewards[2]["params"]["model"], "processor": str(tmp_path)})
    assert no_resize.decode_min_side() == 0  # a crop of the full-size image: no draft
    CLIPImageProcessorPil(size={"height": 48, "width": 80}, do_center_crop=False).save_pretrained(str(tmp_path))
    squash = create_reward("nsfw", {"model": rewards[2]["params"]["model"], "processor": str(tmp_path)})
    assert squash.decode_min_side() == 80  # both sides must stay >= the fixed size they are squashed to


def test_draft_scores_are_the_processor_on_the_draft_decode_and_drift_little(rewards, tmp_path):
    imgs, src = images(), photo_corpus(tmp_path / "in")
    rows = {}
    for name, draft in (("full", False), ("draft", True)):
        cfg = {"input": {"source": [str(src)], "batch_size": 4, "jpeg_draft": draft}, "rewards": rewards,
               "output": {"output_dir": str(tmp_path / name), "samples_per_shard": 4}}
        assert filter_corpus(filter_config_from_dict(cfg))["manifest"]["counts"]["samples"]["balanced"]
        rows[name] = {r["key"]: r for r in pq.read_table(sorted((tmp_path / name / "index").glob("*.parquet")))
                      .to_pylist()}
    keys = sorted(imgs)
    for run in rows.values():
        assert run["truncated"]["reason"] == "corrupt_image"  # damaged data is still found at reduced scale
        for k in keys:  # the original size is recorded, not the decoded one
            assert (run[k]["width"], run[k]["height"]) == Image.open(io.BytesIO(imgs[k])).size
    drafted = [by_hand_draft(imgs[k]) for k in keys]
    assert all(d.size != Image.open(io.BytesIO(imgs[k])).size for d, k in zip(drafted, keys))  # all shrink
    prompts = [f"caption of {k}" for k in keys]
    for spec in rewards:
        reward = create_reward(spec["name"], spec["params"])
        reward.load()
        col = f"score_{spec['name']}"
        full = [rows["full"][k][col] for k in keys]
        draft = [rows["draft"][k][col] for k in keys]
        # the draft run's scores are the reward's on PIL's draft decode, done here by hand
        assert draft == pytest.approx(reward.score_batch(drafted, prompts), abs=1e-5)
        spread = max(full) - min(full)
        drift = max(abs(a - b) for a, b in zip(full, draft))
        assert full != draft and drift < 0.1 * spread, (spec["name"], drift, spread)
