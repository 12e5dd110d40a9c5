"""Bad input is counted, never lost: broken prompt lines, NaN images (fp16-style) and NaN reward scores."""
import glob
import json
from typing import Sequence

import datasets
import torch
import webdataset as wds
from diffusers import AutoencoderKL

from conftest import tiny_build_config
from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
from synpref.schemas.hf_features import features_from_manifest
from synpref.transforms.rewards import Reward, register_reward

GOOD = ["a red cube", "two green apples", "a cat under a table", "a sign that says OPEN", "glitch in the matrix"]


@register_reward("nan_on_glitch")
class NanOnGlitch(Reward):
    """A reward that, like a broken fp16 scorer, returns NaN for the first image of prompts with 'glitch'."""

    def score_batch(self, images, prompts: Sequence[str]):
        return [float("nan") if i == 0 and "glitch" in p else float(i) for i, p in enumerate(prompts)]


def poisoned_copy(src: str, dst: str) -> str:
    """Save a copy of a tiny SD pipeline whose VAE decoder emits NaN, as a broken fp16 VAE does."""
    import shutil

    shutil.copytree(src, dst)
    vae = AutoencoderKL.from_pretrained(dst, subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.fill_(float("nan"))
    vae.save_pretrained(f"{dst}/vae")
    return dst


def test_bad_prompts_nan_images_and_nan_scores_are_all_accounted_for(demo_models, tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_bytes(b"\n".join([g.encode() for g in GOOD] + [
        b"",                          # empty
        b"word " * 100,               # too long
        b"a  red cube",               # duplicate after normalisation
        b"\xff\xfe broken bytes",     # not UTF-8
    ]))
    cfg = tiny_build_config(demo_models, tmp_path / "out", candidates_per_generator=3,
                            prompts={"source": str(src), "max_chars": 200})
    cfg["generators"][1]["model"] = poisoned_copy(demo_models["tiny-sd-b"], str(tmp_path / "nan-sd"))
    cfg["rewards"].append({"name": "nan_on_glitch"})
    result = build(build_config_from_dict(cfg))
    counts = result["manifest"]["counts"]

    assert counts["prompts"]["in"] == 9
    assert counts["prompts"]["dropped"] == {"empty_prompt": 1, "too_long": 1, "duplicate": 1, "non_utf8": 1}
    assert counts["prompts"]["written"] == 5
    # 5 prompts x 2 generators x 3 candidates; the poisoned generator's 15 images are NaN,
    # and the glitch prompt loses one more image to a NaN score (it keeps 2, enough to rank).
    assert counts["candidates"]["in"] == 30
    assert counts["candidates"]["dropped"] == {"nan_image": 15, "nan_score": 1}
    assert counts["candidates"]["written"] == 14
    assert all(counts[level]["balanced"] for level in counts)

    drops = [json.loads(line) for f in glob.glob(f"{tmp_path}/out/dead_letter/*.jsonl") for line in open(f)]
    assert len(drops) == sum(c["dropped_total"] for c in counts.values())
    nan_score = [d for d in drops if d["reason"] == "nan_score"]
    assert nan_score[0]["detail"] == "non-finite score from nan_on_glitch"

    ranked = sorted(glob.glob(f"{tmp_path}/out/ranked/*.tar"))
    sizes = sorted(len(json.loads(s["json"])["candidates"]) for s in wds.WebDataset(ranked, shardshuffle=False))
    assert sizes == [2, 3, 3, 3, 3]
    # k varies (2 or 3), so datasets needs the features spelled out; the manifest has what it takes.
    features = features_from_manifest(result["manifest"], "ranked")
    hf = datasets.load_dataset("webdataset", data_files={"train": ranked}, split="train", features=features)
    assert hf.num_rows == 5
    assert sorted(sum(row[f"img{i}.png"] is not None for i in range(6)) for row in hf) == [2, 3, 3, 3, 3]
    # The dataset card in the output folder declares the same features: load the folder by config name.
    card = datasets.load_dataset(str(tmp_path / "out"), "ranked", split="train")
    assert card.num_rows == 5 and card.features == features
    assert datasets.load_dataset(str(tmp_path / "out"), "pairs", split="train").num_rows == counts["pairs"]["written"]


def test_a_prompt_left_with_one_usable_candidate_is_dropped_with_its_reason(demo_models, tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_text("glitch one\nfine prompt\n")
    cfg = tiny_build_config(demo_models, tmp_path / "out", prompts={"source": str(src)})
    cfg["generators"][1]["model"] = poisoned_copy(demo_models["tiny-sd-b"], str(tmp_path / "nan-sd"))
    cfg["rewards"].append({"name": "nan_on_glitch"})
    counts = build(build_config_from_dict(cfg))["manifest"]["counts"]
    # Per prompt: 2 images from the good generator, 2 NaN images from the poisoned one.
    # "glitch one" also loses a good image to a NaN score: 1 usable < 2, so the prompt is dropped
    # and its last candidate goes with it.
    assert counts["prompts"]["dropped"] == {"too_few_candidates": 1}
    assert counts["candidates"]["dropped"] == {"nan_image": 4, "nan_score": 1, "group_dropped": 1}
    assert counts["prompts"]["written"] == 1 and counts["candidates"]["written"] == 2
    assert all(counts[level]["balanced"] for level in counts)
