"""CLIP-family rewards (hpsv2, pickscore, laion_aesthetic, clip_score) on tiny random models in the real
architectures and checkpoint formats, each checked against a computation written out here, independently
of the reward's own helpers."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synpref.transforms.rewards import create_reward

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TINY = "synpref-test-clip-rewards"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PROMPTS = ["a red cube on a blue sphere", "static", "three cats, watercolour, wide landscape"]


def images():
    """Non-square images with content up to their edges (where a crop and a pad differ), and a square one."""
    rng = np.random.default_rng(0)
    wide = np.zeros((60, 150, 3), np.uint8)
    wide[:, :50] = (250, 20, 20)
    wide[:, 100:] = rng.integers(0, 256, (60, 50, 3))
    tall = rng.integers(0, 256, (130, 70, 3), dtype=np.uint8)
    square = np.tile(np.linspace(0, 255, 80, dtype=np.uint8)[:, None, None], (1, 80, 3))
    return [Image.fromarray(a) for a in (wide, tall, square)]


def to_pixels(pil_images):
    """uint8 RGB -> [0, 1] -> CLIP mean/std, with torchvision's functional ops."""
    from torchvision.transforms import functional as TF

    return torch.stack([TF.normalize(TF.to_tensor(im), MEAN, STD) for im in pil_images])


# ---------------------------------------------------------------- open_clip tiny model and checkpoints


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    out = tmp_path_factory.mktemp("clip-rewards")
    cfg_path = out / f"{TINY}.json"
    cfg_path.write_text(json.dumps(TINY_CFG))
    torch.manual_seed(11)
    model = open_clip.CLIP(**TINY_CFG).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 1}, out / "HPS_v2.1_compressed.pt")  # the released layout
    save_file(sd, str(out / "hps.safetensors"))
    save_file(sd, str(out / "clip.safetensors"))
    torch.save(torch.nn.Linear(4, 4), out / "whole_module.pt")  # a pickled module, not a state dict

    torch.manual_seed(12)
    widths = [32, 24, 16, 8, 4, 1]  # the released head is 768-1024-128-64-16-1; widths come from the file
    head = {}
    for n, i in enumerate((0, 2, 4, 6, 7)):
        head[f"layers.{i}.weight"] = torch.randn(widths[n + 1], widths[n]) / widths[n] ** 0.5
        head[f"layers.{i}.bias"] = torch.randn(widths[n + 1])
    torch.save(head, out / "sac+logos+ava1-l14-linearMSE.pth")
    save_file(head, str(out / "aesthetic.safetensors"))
    return {"dir": out, "model": model, "head": head, "config": str(cfg_path),
            "tokenizer": open_clip.get_tokenizer("ViT-B-32")}


def hps(tiny, checkpoint="HPS_v2.1_compressed.pt", **kw):
    return create_reward("hpsv2", {"checkpoint": str(tiny["dir"] / checkpoint), "model": TINY,
                                   "model_config": tiny["config"], "device": "cpu", **kw})


def cosines(tiny, pixels, prompts):
    model = tiny["model"]
    with torch.no_grad():
        a = model.encode_image(pixels)
        b = model.encode_text(tiny["tokenizer"](prompts))
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).tolist()


def pad_by_hand(im, size):
    """HPS's ResizeMaxSize, applied after ToTensor: longest side to size by torch's antialiased bicubic on
    floats in [0, 1] (sizes rounded; no 8-bit rounding, no clamping), zero padding split //2 left/top."""
    x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = x.shape[1:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    top, left = (size - nh) // 2, (size - nw) // 2
    x = F.pad(x, (left, size - nw - left, top, size - nh - top))
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


def pad_8bit(im, size):
    """The same pad with Pillow's 8-bit bicubic resize: what HPS does *not* do (the test must tell them apart)."""
    w, h = im.size
    nw, nh = round(w * size / max(w, h)), round(h * size / max(w, h))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(im.convert("RGB").resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def crop_by_hand(images_, size):
    import open_clip

    t = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD)
    return torch.stack([t(im) for im in images_])


def test_hpsv2_pads_to_square_and_scores_the_cosine(tiny):
    ims = images()
    padded = torch.stack([pad_by_hand(im, 64) for im in ims])
    expected = cosines(tiny, padded, PROMPTS)
    cropped = cosines(tiny, crop_by_hand(ims, 64), PROMPTS)
    # the test can tell a pad from a crop: on the non-square images the two give different scores
    assert all(abs(e - c) > 1e-3 for e, c in zip(expected[:2], cropped[:2]))
    for ckpt in ("HPS_v2.1_compressed.pt", "hps.safetensors"):  # pickled {"state_dict": ...} and safetensors
        reward = hps(tiny, ckpt)
        reward.load()
        assert reward.score_batch(ims, PROMPTS) == pytest.approx(expected, abs=1e-5)
        assert torch.allclose(reward.preprocess(ims), padded, atol=1e-6)
        # resizing the 8-bit image instead (Pillow) is a different tensor: the check above can fail
        assert (reward.preprocess(ims) - to_pixels([pad_8bit(im, 64) for im in ims])).abs().max() > 1e-2
        assert reward.preprocess_key()[0] == "clip_pad_square"
    assert all(-1 <= s <= 1 for s in expected)  # raw cosine, not x100


def test_hpsv2_params_files_and_config_errors(tiny):
    reward = hps(tiny)
    assert reward.params()["version"] == "v2.1" and reward.describe()["name"] == "hpsv2"
    assert reward.files() == {"checkpoint": str(tiny["dir"] / "HPS_v2.1_compressed.pt"), "model_config": tiny["config"]}
    assert hps(tiny, "hps.safetensors", version="v2.0").params()["version"] == "v2.0"
    with pytest.raises(ValueError, match="is HPS v2.1, but version is 'v2.0'"):
        hps(tiny, version="v2.0")
    with pytest.raises(ValueError, match="'checkpoint' is required"):
        create_reward("hpsv2")
    with pytest.raises(ValueError, match="version must be one of"):
        hps(tiny, "hps.safetensors", version="2.1")


def test_half_precision_on_cpu_falls_back_to_float32_with_a_warning(tiny):
    reward = hps(tiny, "hps.safetensors", dtype="float16")
    with pytest.warns(UserWarning, match="float16 is for GPUs; running in float32"):
        reward.load()
    ref = hps(tiny, "hps.safetensors")
    assert reward.score_batch(images(), PROMPTS) == ref.score_batch(images(), PROMPTS)
    with pytest.raises(ValueError, match="dtype must be one of"):
        hps(tiny, dtype="fp8")


def test_whole_pickled_modules_are_refused_with_the_conversion_command(tiny):
    from synpref.transforms.checkpoints import load_state_dict

    path = str(tiny["dir"] / "whole_module.pt")
    with pytest.raises(ValueError) as err:
        load_state_dict(path)
    assert "\n" not in str(err.value) and "python -m synpref.transforms.checkpoints" in str(err.value)
    with pytest.raises(ValueError, match="python -m synpref.transforms.checkpoints"):
        hps(tiny, "whole_module.pt").load()
    with pytest.raises(ValueError, match="python -m synpref.transforms.checkpoints"):
        create_reward("laion_aesthetic", {"head": path, "model": TINY, "checkpoint": str(tiny["dir"] / "clip.safetensors"),
                                          "model_config": tiny["config"], "device": "cpu"}).load()


# ---------------------------------------------------------------- LAION aesthetic


def aesthetic(tiny, head="sac+logos+ava1-l14-linearMSE.pth", **kw):
    return create_reward("laion_aesthetic", {"head": str(tiny["dir"] / head), "model": TINY, "device": "cpu",
                                             "checkpoint": str(tiny["dir"] / "clip.safetensors"),
                                             "model_config": tiny["config"], **kw})


def test_laion_aesthetic_is_the_mlp_on_the_normalised_image_embedding(tiny):
    ims, h = images(), tiny["head"]
    with torch.no_grad():
        x = tiny["model"].encode_image(crop_by_hand(ims, 64))
    x = x / x.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # no activations between the layers; dropout is off at inference
        x = F.linear(x, h[f"layers.{i}.weight"], h[f"layers.{i}.bias"])
    expected = x[:, 0].tolist()
    for head in ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic.safetensors"):
        reward = aesthetic(tiny, head)
        reward.load()
        assert reward.score_batch(ims, PROMPTS) == pytest.approx(expected, abs=1e-5)
        assert reward.score_batch(ims, ["", "", ""]) == reward.score_batch(ims, PROMPTS)  # the prompt is ignored
    assert len(set(round(e, 4) for e in expected)) == 3


def test_laion_aesthetic_checks_the_head_and_names_the_openai_weights(tiny, tmp_path):
    from safetensors.torch import save_file

    bad = dict(tiny["head"])
    bad["layers.1.weight"] = bad.pop("layers.2.weight")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"expected keys layers.\{0,2,4,6,7\}"):
        create_reward("laion_aesthetic", {"head": str(tmp_path / "bad.safetensors"), "model": TINY, "device": "cpu",
                                          "checkpoint": str(tiny["dir"] / "clip.safetensors"),
                                          "model_config": tiny["config"]}).load()
    wide = {k: v for k, v in tiny["head"].items()}
    wide["layers.0.weight"] = torch.randn(24, 48)
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="takes 48-d embeddings but .* gives 32-d"):
        create_reward("laion_aesthetic", {"head": str(tmp_path / "wide.safetensors"), "model": TINY, "device": "cpu",
                                          "checkpoint": str(tiny["dir"] / "clip.safetensors"),
                                          "model_config": tiny["config"]}).load()
    default = create_reward("laion_aesthetic", {"head": "/heads/sac+logos+ava1-l14-linearMSE.pth"})
    assert default.params()["pretrained"] == "openai"
    assert default.files() == {"head": "/heads/sac+logos+ava1-l14-linearMSE.pth",
                               "pretrained": "hf-hub:timm/vit_large_patch14_clip_224.openai"}
    with pytest.raises(ValueError, match="'head' is required"):
        create_reward("laion_aesthetic")


def test_openai_tags_get_quick_gelu():
    """open_clip 3.x builds ViT-L-14 + 'openai' with plain GELU (it only warns): wrong embeddings."""
    from synpref.transforms.rewards.clip_score import needs_quick_gelu

    assert needs_quick_gelu("ViT-L-14", "openai") and needs_quick_gelu("ViT-B-32", "openai")
    assert not needs_quick_gelu("ViT-L-14-quickgelu", "openai")
    assert not needs_quick_gelu("ViT-H-14", "laion2b_s32b_b79k")


# ---------------------------------------------------------------- shared preprocessing and clip_score


def test_clip_score_and_aesthetic_share_one_preprocessing_and_clip_score_is_unchanged(tiny):
    clip = create_reward("clip_score", {"model": TINY, "model_config": tiny["config"], "variant": "cosine",
                                        "checkpoint": str(tiny["dir"] / "clip.safetensors"), "device": "cpu"})
    aes = aesthetic(tiny)
    key = ("clip_center_crop", 64, MEAN, STD)
    assert clip.preprocess_key() == aes.preprocess_key() == key
    assert hps(tiny).preprocess_key() != key
    assert create_reward("pickscore").preprocess_key() != key
    ims = images()
    shared = clip.preprocess(ims)
    assert torch.equal(shared, crop_by_hand(ims, 64))  # bit-exact with open_clip's own transform
    expected = cosines(tiny, crop_by_hand(ims, 64), PROMPTS)  # what clip_score computed before sharing
    assert clip.score_preprocessed(shared, PROMPTS) == pytest.approx(expected, abs=1e-5)
    assert clip.score_batch(ims, PROMPTS) == pytest.approx(expected, abs=1e-5)
    assert aes.score_preprocessed(shared, PROMPTS) == aes.score_batch(ims, PROMPTS)
    assert clip.files() == {"checkpoint": str(tiny["dir"] / "clip.safetensors"), "model_config": tiny["config"]}


# ---------------------------------------------------------------- PickScore (transformers CLIPModel)

CLIP_H_PROCESSOR = {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}, "resample": 3,
                    "do_resize": True, "do_center_crop": True, "do_rescale": True, "do_normalize": True,
                    "image_mean": list(MEAN), "image_std": list(STD)}


@pytest.fixture(scope="module")
def pick(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from synpref.demo.tiny_models import _write_clip_tokenizer_files

    out = tmp_path_factory.mktemp("pickscore")
    _write_clip_tokenizer_files(out / "bpe")
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "bpe"), pad_token="<|endoftext|>", model_max_length=77)
    image_processor = CLIPImageProcessorPil(**CLIP_H_PROCESSOR)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out / "processor"))
    torch.manual_seed(13)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=16)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)  # not the default 2.6592: the test fails if the scale is ignored
    model.save_pretrained(str(out / "model"), safe_serialization=True)
    return {"dir": out, "model": model, "tokenizer": tokenizer, "image_processor": image_processor}


def test_pickscore_is_the_exp_logit_scale_times_the_cosine(pick):
    ims = images()
    pixels = pick["image_processor"](images=ims, return_tensors="pt")["pixel_values"]
    tok = pick["tokenizer"](PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    m = pick["model"]
    with torch.no_grad():
        a = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        b = m.text_projection(m.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output)
    cos = ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)))
    expected = (np.exp(1.7) * cos).tolist()

    reward = create_reward("pickscore", {"model": str(pick["dir"] / "model"),
                                         "processor": str(pick["dir"] / "processor"), "device": "cpu"})
    reward.load()
    scores = reward.score_batch(ims, PROMPTS)
    assert scores == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert [s / c for s, c in zip(scores, cos.tolist())] == pytest.approx([np.exp(1.7)] * 3, rel=1e-4)
    assert reward.files() == {"model": str(pick["dir"] / "model"), "processor": str(pick["dir"] / "processor")}


def test_pickscore_names_both_downloads_by_default():
    reward = create_reward("pickscore")
    assert reward.files() == {"model": "yuvalkirstain/PickScore_v1",
                              "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
    assert reward.params()["image_backend"] == "pil"
    with pytest.raises(ValueError, match="image_backend must be one of"):
        create_reward("pickscore", {"image_backend": "cv2"})


def test_hf_clip_processor_is_not_bit_identical_to_clip_center_crop(pick, tmp_path):
    """Why pickscore has its own preprocess key.

    The PIL image processor (PickScore's original) equals clip_center_crop to the bit on most sizes but floors
    the crop offset where torchvision rounds it, so (resized long side - 224) = 3 mod 4 shifts by a pixel;
    transformers 5's default torchvision backend differs on every image (resampling, about one grey level).
    """
    from transformers import AutoImageProcessor, CLIPImageProcessor

    from synpref.transforms.rewards.preprocess import clip_center_crop

    rng = np.random.default_rng(1)
    pil_proc = pick["image_processor"]
    tv_proc = CLIPImageProcessor(**CLIP_H_PROCESSOR)

    def both(w, h):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        return (pil_proc(images=[im], return_tensors="pt")["pixel_values"],
                tv_proc(images=[im], return_tensors="pt")["pixel_values"], clip_center_crop([im], 224))

    for w, h in [(512, 512), (1024, 768), (768, 1024), (64, 64), (300, 231)]:
        p, t, ref = both(w, h)
        assert torch.equal(p, ref)
        assert (t - ref).abs().max() > 1e-3
    p, _, ref = both(224, 227)  # 227 - 224 = 3: HF crops at row 1, torchvision / open_clip at row 2
    assert (p - ref).abs().max() > 1e-3

    # the LAION CLIP-H repo's legacy preprocessor_config.json loads as the same PIL processor
    legacy = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(MEAN), "image_std": list(STD),
              "resample": 3, "size": 224}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    loaded = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    im = images()[0]
    assert torch.equal(loaded(images=[im], return_tensors="pt")["pixel_values"],
                       pil_proc(images=[im], return_tensors="pt")["pixel_values"])
