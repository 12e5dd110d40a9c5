"""``nsfw``: diffusers' StableDiffusionSafetyChecker as a continuous score, on a tiny random checker saved as the
release is (``save_pretrained`` + the legacy ``preprocessor_config.json``), checked against a computation
written out here and against the checker's own ``forward`` flags, and used as a corpus filter.

The tiny checker's projection is set so the eight test images embed orthonormally; each image then has its
own concept (and some a special-care concept) whose threshold gives it a chosen margin: plain hits and
misses, margins on either side of the checker's 3-decimal rounding, and the special-care +0.01 flipping one.
"""
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synpref.cli import main
from synpref.transforms.rewards import create_reward

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
SIDE = 32
# image -> (concept margin, special-care margin or None); the flag the checker should give
MARGINS = [(0.05, None), (-0.05, None), (0.0003, None), (0.0008, None),
           (-0.005, 0.1), (-0.005, 0.0003), (-0.02, 0.1), (0.3, 0.1)]
FLAGGED = [True, False, False, True, True, False, False, True]


def images():
    """Solid colours, gradients and stripes of different sizes (distinct, linearly independent embeddings)."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(len(MARGINS)):
        h, w = 36 + 4 * i, 48 - 2 * i
        if i % 3 == 0:
            a = np.tile(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), (h, w, 1))
        elif i % 3 == 1:
            a = np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
            a[..., i % 3] = 255 - a[..., i % 3]
        else:
            a = np.zeros((h, w, 3), np.uint8)
            a[:: 2 + i // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(Image.fromarray(a))
    return out


def processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                 resample=3, image_mean=MEAN, image_std=STD)


def pixels(ims):
    return processor()(images=[im.convert("RGB") for im in ims], return_tensors="pt")["pixel_values"]


def pooled(checker, px):
    with torch.no_grad():
        return checker.vision_model(pixel_values=px).pooler_output


def cosines(checker, px):
    """processor pixels -> pooled output -> projection -> cosine to each concept, with functional ops."""
    e = F.normalize(F.linear(pooled(checker, px), checker.visual_projection.weight), dim=-1)
    return (e @ F.normalize(checker.concept_embeds, dim=-1).T, e @ F.normalize(checker.special_care_embeds, dim=-1).T)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(5)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(image_size=SIDE, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    ims, n = images(), len(MARGINS)
    p = pooled(checker, pixels(ims))  # [8, 32]
    q = torch.linalg.qr(torch.randn(16, n))[0].T  # 8 orthonormal 16-d rows
    with torch.no_grad():
        checker.visual_projection.weight.copy_(q.T @ torch.linalg.pinv(p.T))  # image i -> q_i
        concepts = F.normalize(torch.randn(17, 16), dim=-1)
        concepts[:n] = q
        checker.concept_embeds.copy_(concepts)
        special = F.normalize(torch.randn(3, 16), dim=-1)
        hit = [i for i, (_, s) in enumerate(MARGINS) if s == 0.1]
        special[0] = F.normalize(q[hit].sum(0), dim=-1)  # one special concept shared by the 0.1 images
        special[1] = q[5]
        checker.special_care_embeds.copy_(special)
        cos, scos = cosines(checker, pixels(ims))
        thresholds = torch.full((17,), 1.5)
        thresholds[:n] = torch.stack([cos[i, i] - m for i, (m, _) in enumerate(MARGINS)])
        checker.concept_embeds_weights.copy_(thresholds)
        checker.special_care_embeds_weights.copy_(torch.stack([scos[hit[0], 0] - 0.1, scos[5, 1] - 0.0003,
                                                               torch.tensor(1.5)]))
    out = tmp_path_factory.mktemp("nsfw") / "safety_checker"
    checker.save_pretrained(str(out), safe_serialization=True)
    legacy = {"crop_size": SIDE, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
              "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN,
              "image_std": STD, "resample": 3, "size": SIDE}  # the CompVis repo's preprocessor_config.json, smaller
    (out / "preprocessor_config.json").write_text(json.dumps(legacy))
    return {"dir": out, "checker": checker}


def by_hand(checker, ims):
    """The score written out: max over concepts of (cos - threshold [+ 0.01 after a special-care hit]) - 0.0005,
    the checker rounding each margin to 3 decimals (so a margin counts once it exceeds 0.0005)."""
    cos, scos = cosines(checker, pixels(ims))
    special = ((scos - checker.special_care_embeds_weights) > 0.0005).any(dim=1)
    margins = cos - checker.concept_embeds_weights + 0.01 * special[:, None]
    return (margins.max(dim=1).values - 0.0005).tolist()


def checker_flags(checker, px):
    with torch.no_grad():
        _, flags = checker(clip_input=px, images=[np.zeros((2, 2, 3))] * len(px))
    return list(flags)


def test_score_is_the_checkers_margin_and_its_sign_is_the_checkers_flag(tiny):
    ims = images()
    reward = create_reward("nsfw", {"model": str(tiny["dir"]), "device": "cpu"})
    reward.load()
    scores = reward.score_batch(ims, ["a prompt"] * len(ims))
    assert scores == pytest.approx(by_hand(tiny["checker"], ims), abs=2e-6)
    expected_margins = [m + (0.01 if s is not None and s > 0.0005 else 0) - 0.0005 for m, s in MARGINS]
    assert scores == pytest.approx(expected_margins, abs=2e-6)  # the fixture planted what it meant to
    assert checker_flags(tiny["checker"], pixels(ims)) == FLAGGED
    assert [s > 0 for s in scores] == FLAGGED  # image 2 (margin +0.0003) is not flagged: rounding counts
    # the loaded checker agrees too, in other batch compositions
    loaded = reward._checker
    assert checker_flags(loaded, reward.preprocess(ims[3:6])) == FLAGGED[3:6]
    assert reward.score_batch(ims[::-1], [""] * len(ims)) == pytest.approx(scores[::-1], abs=1e-6)


def test_params_files_and_errors(tiny):
    default = create_reward("nsfw")
    assert default.files() == {"model": "CompVis/stable-diffusion-safety-checker",
                               "processor": "CompVis/stable-diffusion-safety-checker"}
    reward = create_reward("nsfw", {"model": str(tiny["dir"]), "processor": str(tiny["dir"]), "device": "cpu"})
    assert reward.describe()["name"] == "nsfw" and set(reward.describe()["files"]) == {"model", "processor"}
    assert reward.preprocess_key() == ("hf_clip_image_processor", str(tiny["dir"]), "pil")
    assert torch.equal(reward.preprocess(images()), pixels(images()))  # the legacy config loads as the PIL processor
    with pytest.raises(ValueError, match="image_backend must be one of"):
        create_reward("nsfw", {"image_backend": "cv2"})
    with pytest.raises(ValueError, match="dtype must be one of"):
        create_reward("nsfw", {"dtype": "fp8"})


def test_filter_with_max_0_drops_exactly_the_flagged_samples(tiny, tmp_path):
    import yaml

    ims = images()
    src = tmp_path / "corpus"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i, im in enumerate(ims):
            buf = io.BytesIO()
            im.save(buf, "PNG")  # lossless: the decoded pixels are the images above
            for name, data in ((f"{i:09d}.png", buf.getvalue()), (f"{i:09d}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    decoded = [Image.open(io.BytesIO(b)) for b in
               [tarfile.open(src / "00000.tar").extractfile(f"{i:09d}.png").read() for i in range(len(ims))]]
    flagged = checker_flags(tiny["checker"], pixels(decoded))
    assert flagged == FLAGGED
    cfg = {"input": {"source": [str(src)], "batch_size": 3},
           "rewards": [{"name": "nsfw", "params": {"model": str(tiny["dir"]), "device": "cpu"}}],
           "filter": {"thresholds": [{"reward": "nsfw", "max": 0}]},
           "output": {"output_dir": str(tmp_path / "out"), "samples_per_shard": 4}}
    (tmp_path / "filter.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["filter", "--config", str(tmp_path / "filter.yaml")]) == 0
    index = {r["key"]: r for r in pq.read_table(sorted((tmp_path / "out" / "index").glob("*.parquet"))).to_pylist()}
    assert {k: r["reason"] for k, r in index.items() if not r["kept"]} == \
        {f"{i:09d}": "above_threshold" for i, f in enumerate(flagged) if f}
    assert sorted(k for k, r in index.items() if r["kept"]) == [f"{i:09d}" for i, f in enumerate(flagged) if not f]


def test_the_sign_follows_the_checkers_rounding_to_the_last_bit():
    """Margins within a few float32 steps of 0.0005 (and random ones): score > 0 iff round(margin, 3) > 0,
    the check the checker's loop makes on each float32 margin."""
    from synpref.transforms.rewards.nsfw import past_rounding_boundary

    edge = np.float32(0.0005)
    steps = np.arange(-64, 65, dtype=np.float32)
    near = edge + steps * (np.nextafter(edge, np.float32(1)) - edge)
    margins = np.concatenate([near, -near, np.random.default_rng(0).normal(0, 0.003, 4000).astype(np.float32)])
    assert margins.dtype == np.float32
    signs = past_rounding_boundary(margins) > 0
    assert list(signs) == [round(m, 3) > 0 for m in margins]
    assert 0 < signs[: len(near)].sum() < len(near)  # the edge is inside the sampled steps
