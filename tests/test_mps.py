"""MPS on a tiny random model in the real architecture, saved with the release's state-dict keys.

The expected scores are computed here by hand from the saved tensors (looked up by the *release's* key
names), following the authors' math: projected text / image tokens, the condition mask, 4 x (cross
attention + parallel rotary self-attention block), the fused CLS token, exp(logit_scale) * cos.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from synpref.transforms.rewards import create_reward

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a red fox in the snow, golden light", "portrait of an old man, detailed face and hands",
           "three cups on a wooden table"]
CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")
LOGIT_SCALE = 1.3  # not CLIP's default 2.6592: the test fails if the scale is ignored
DIM, HEADS, DIM_HEAD, FF_MULT, LAYERS = 16, 2, 8, 4, 4
EOS_ID = 49407


def images():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(256, 256), (300, 240), (240, 320)]]


def release_fusion_state(gen):
    """cross_model.* tensors with the authors' key names and shapes (Cross_model(dim, 4, dim_head, heads, 4))."""
    inner, ff = HEADS * DIM_HEAD, FF_MULT * DIM

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.35

    sd = {}
    for i in range(LAYERS):
        c, s = f"cross_model.layers.{i}.0.fn.", f"cross_model.layers.{i}.1.fn."
        sd.update({c + "norm.weight": 1 + 0.2 * torch.randn(DIM, generator=gen), c + "norm.bias": 0.1 * torch.randn(DIM, generator=gen),
                   c + "to_q.weight": w(inner, DIM), c + "to_kv.weight": w(2 * DIM_HEAD, DIM),
                   c + "to_out.weight": w(DIM, inner), c + "ff.0.weight": w(2 * ff, DIM), c + "ff.2.weight": w(DIM, ff),
                   s + "norm.weight": 1 + 0.2 * torch.randn(DIM, generator=gen), s + "norm.bias": 0.1 * torch.randn(DIM, generator=gen),
                   s + "rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, DIM_HEAD, 2).float() / DIM_HEAD)),
                   s + "fused_attn_ff_proj.weight": w(inner + 2 * DIM_HEAD + 2 * ff, DIM),
                   s + "attn_out.weight": w(DIM, inner), s + "ff_out.1.weight": w(DIM, ff)})
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from synpref.demo.tiny_models import _write_clip_tokenizer_files

    out = tmp_path_factory.mktemp("mps")
    _write_clip_tokenizer_files(out / "bpe")
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "bpe"), pad_token="!", model_max_length=77)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                            resample=3, image_mean=list(MEAN), image_std=list(STD))
    processor_dir = out / "processor"  # like the LAION CLIP-H repo: tokenizer, image processor and config.json
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(processor_dir))
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=DIM)
    config.save_pretrained(str(processor_dir))
    clip = CLIPModel(config).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(LOGIT_SCALE)
        # a low-rank text projection spreads the prompt tokens' condition similarities, so that the mask
        # (normalised similarity > 0.3) drops a good share of every prompt's tokens (random full-rank
        # features all sit near the maximum: nothing would be masked and the mask would go untested)
        g = torch.Generator().manual_seed(1)
        clip.text_projection.weight.copy_(torch.randn(DIM, 3, generator=g) @ torch.randn(3, 32, generator=g) / 4)
    sd = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    # transformers < 4.31 saved these buffers; the release may carry them
    sd["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["model.vision_model.embeddings.position_ids"] = torch.arange(50)[None]
    sd.update(release_fusion_state(torch.Generator().manual_seed(11)))
    save_file(sd, str(out / "mps.safetensors"))
    return {"dir": out, "processor": str(processor_dir), "checkpoint": str(out / "mps.safetensors"), "clip": clip,
            "sd": sd, "tokenizer": tokenizer, "image_processor": image_processor}


# ---------------------------------------------------------------- the authors' math, by hand

def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def swiglu(a):
    half = a.shape[-1] // 2
    value, gate = a[..., :half], a[..., half:]
    return value * gate * torch.sigmoid(gate)


def rope(t, n):
    """Rotary embedding on the two halves of the last dim, with angles pos / 10000^(2i/d)."""
    d = t.shape[-1]
    inv = torch.tensor([10000 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = (torch.arange(n, dtype=torch.float64)[:, None] * inv[None]).float()
    a, b = t[..., : d // 2], t[..., d // 2:]
    return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], dim=-1)


def cross_layer(sd, i, x, ctx, keep):
    p = f"cross_model.layers.{i}.0.fn."
    xn = layer_norm(x, sd[p + "norm.weight"], sd[p + "norm.bias"])
    kv = ctx @ sd[p + "to_kv.weight"].T
    k, v = kv[..., :DIM_HEAD], kv[..., DIM_HEAD:]
    heads = []
    for h in range(HEADS):
        q = xn @ sd[p + "to_q.weight"][h * DIM_HEAD:(h + 1) * DIM_HEAD].T / math.sqrt(DIM_HEAD)
        logits = q @ k.T
        logits = logits.masked_fill(~keep[None, :], float("-inf"))
        heads.append(torch.softmax(logits, dim=-1) @ v)
    attn = torch.cat(heads, dim=-1) @ sd[p + "to_out.weight"].T
    ff = swiglu(xn @ sd[p + "ff.0.weight"].T) @ sd[p + "ff.2.weight"].T
    return x + attn + ff


def parallel_layer(sd, i, x):
    p = f"cross_model.layers.{i}.1.fn."
    n, inner, ff_inner = x.shape[0], HEADS * DIM_HEAD, FF_MULT * DIM
    xn = layer_norm(x, sd[p + "norm.weight"], sd[p + "norm.bias"])
    proj = xn @ sd[p + "fused_attn_ff_proj.weight"].T
    q_all = proj[:, :inner]
    k = rope(proj[:, inner:inner + DIM_HEAD], n)
    v = proj[:, inner + DIM_HEAD:inner + 2 * DIM_HEAD]
    ff = proj[:, inner + 2 * DIM_HEAD:]
    assert ff.shape[-1] == 2 * ff_inner
    heads = []
    for h in range(HEADS):
        q = rope(q_all[:, h * DIM_HEAD:(h + 1) * DIM_HEAD], n) / math.sqrt(DIM_HEAD)
        heads.append(torch.softmax(q @ k.T, dim=-1) @ v)
    return x + torch.cat(heads, -1) @ sd[p + "attn_out.weight"].T + swiglu(ff) @ sd[p + "ff_out.1.weight"].T


def text_tokens(tiny, text):
    """Every token's projected feature (final layer norm applied), and the first EOS position."""
    clip, sd = tiny["clip"], tiny["sd"]
    ids = tiny["tokenizer"](text, max_length=77, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    hidden = clip.text_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
    hidden = layer_norm(hidden, sd["model.text_model.final_layer_norm.weight"], sd["model.text_model.final_layer_norm.bias"])
    eos = int((ids[0] == EOS_ID).nonzero()[0])
    return hidden @ sd["model.text_projection.weight"].T, eos


def by_hand(tiny, ims, prompts, use_mask=True):
    """(scores, cosines, kept-token counts), one image and prompt at a time as the authors' eval does."""
    clip, sd = tiny["clip"], tiny["sd"]
    # the authors' infer_one_sample passes image_input.half(): the pixels are rounded to float16
    pixels = tiny["image_processor"](images=ims, return_tensors="pt")["pixel_values"].half().float()
    cond, _ = text_tokens(tiny, CONDITION)
    scores, cosines, kept = [], [], []
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            tok, eos = text_tokens(tiny, prompt)
            sim = (tok @ cond.T).max(dim=1).values  # each prompt token's best match in the condition sentence
            keep = sim / sim.max() > 0.3 if use_mask else torch.ones(len(sim), dtype=torch.bool)
            vis = clip.vision_model(pixel_values=pixels[b:b + 1], output_hidden_states=True).hidden_states[-1][0]
            x = vis @ sd["model.visual_projection.weight"].T  # all tokens, no post layer norm
            for i in range(LAYERS):
                x = parallel_layer(sd, i, cross_layer(sd, i, x, tok, keep))
            c = torch.nn.functional.cosine_similarity(x[0], tok[eos], dim=0).item()
            scores.append(math.exp(float(sd["model.logit_scale"])) * c)
            cosines.append(c)
            kept.append(int(keep.sum()))
    return scores, cosines, kept


# ---------------------------------------------------------------- tests

def make(tiny, **kw):
    return create_reward("mps", {"checkpoint": tiny["checkpoint"], "processor": tiny["processor"], "device": "cpu", **kw})


def test_mps_equals_the_authors_math_by_hand(tiny):
    ims = images()
    reward = make(tiny)
    reward.load()
    scores = reward.score_batch(ims, PROMPTS)
    expected, cosines, kept = by_hand(tiny, ims, PROMPTS)
    assert scores == pytest.approx(expected, rel=1e-4, abs=1e-5)

    # the scale is exp(logit_scale) from the checkpoint, not CLIP's default
    assert [s / c for s, c in zip(scores, cosines)] == pytest.approx([math.exp(LOGIT_SCALE)] * 3, rel=1e-4)
    # the condition mask is live: it drops some prompt tokens (not all), and without it the scores differ
    assert all(0 < k < 77 for k in kept), kept
    unmasked, _, _ = by_hand(tiny, ims, PROMPTS, use_mask=False)
    assert all(abs(s - u) > 1e-3 for s, u in zip(scores, unmasked)), (scores, unmasked)

    # batching does not change a score (the mask is normalised per prompt, as the authors' per-image eval)
    assert reward.score_batch(ims[1:2], PROMPTS[1:2]) == pytest.approx(scores[1:2], rel=1e-5, abs=1e-6)
    assert reward.files() == {"checkpoint": tiny["checkpoint"], "processor": tiny["processor"]}
    # shares the HF processor tensor with pickscore in an ensemble
    assert reward.preprocess_key() == create_reward("pickscore", {"processor": tiny["processor"]}).preprocess_key()


def test_mps_rounds_pixels_to_float16_as_the_authors(tiny):
    """The authors' eval hands the vision tower ``pixel_values.half()``; float32 pixels that float16 cannot
    hold score exactly as their rounded values do, and differently from pixels moved off float16's grid."""
    reward = make(tiny)
    reward.load()
    pixels = reward.preprocess(images()[:2])
    assert not torch.equal(pixels, pixels.half().float())  # the processor's output is not on float16's grid
    rounded = pixels.half().float()
    assert reward.score_preprocessed(pixels, PROMPTS[:2]) == reward.score_preprocessed(rounded, PROMPTS[:2])
    # a shift of one float16 step changes the score (so the equality above is the rounding, not insensitivity)
    step = (rounded.half().float().abs() * 2 ** -10).clamp(min=2 ** -24)
    assert reward.score_preprocessed(rounded + step, PROMPTS[:2]) != reward.score_preprocessed(rounded, PROMPTS[:2])


def test_mps_condition_and_threshold_are_params(tiny):
    ims, prompts = images()[:1], PROMPTS[:1]
    base = make(tiny).score_batch(ims, prompts)
    assert make(tiny, mask_threshold=-1e9).score_batch(ims, prompts) == pytest.approx(
        by_hand(tiny, ims, prompts, use_mask=False)[0], rel=1e-4, abs=1e-5)
    assert make(tiny, condition="a completely different sentence").score_batch(ims, prompts) != pytest.approx(base)


def test_mps_defaults_and_validation():
    from synpref.transforms.rewards.mps import CONDITION_OVERALL

    r = create_reward("mps", {"checkpoint": "MPS_overall.safetensors"})
    assert r.files() == {"checkpoint": "MPS_overall.safetensors", "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}
    assert r.params()["condition"] == CONDITION_OVERALL == CONDITION and r.params()["mask_threshold"] == 0.3
    r = create_reward("mps", {"checkpoint": "c.safetensors", "config": "/cfg"})
    assert r.files()["config"] == "/cfg"
    with pytest.raises(ValueError, match="'checkpoint' is required"):
        create_reward("mps")
    with pytest.raises(ValueError, match="image_backend"):
        create_reward("mps", {"checkpoint": "c.safetensors", "image_backend": "cv2"})


def test_mps_unmatched_keys_fail_in_one_line(tiny, tmp_path):
    from safetensors.torch import save_file

    sd = dict(tiny["sd"])
    sd.pop("cross_model.layers.2.0.fn.to_out.weight")
    sd["cross_model.layers.1.1.fn.surprise.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    reward = create_reward("mps", {"checkpoint": str(tmp_path / "bad.safetensors"), "processor": tiny["processor"],
                                   "device": "cpu"})
    with pytest.raises(ValueError) as e:
        reward.load()
    msg = str(e.value)
    assert "\n" not in msg
    assert "fusion.blocks.2.cross.to_out.weight" in msg and "cross_model.layers.1.1.fn.surprise.weight" in msg


def test_whole_pickled_module_is_refused_then_converted(tiny, tmp_path):
    """The release is a whole pickled module: refused by the reward, converted once by the documented command."""
    from synpref.transforms.rewards.mps import main

    root = torch.nn.Module()  # a module tree whose state_dict() has the release's keys
    for key, value in tiny["sd"].items():
        *path, leaf = key.split(".")
        mod = root
        for name in path:
            if not hasattr(mod, name):
                mod.add_module(name, torch.nn.Module())
            mod = getattr(mod, name)
        mod.register_buffer(leaf, value.clone())
    torch.save(root, str(tmp_path / "MPS_overall_checkpoint.pth"))

    pickled = make(tiny, checkpoint=str(tmp_path / "MPS_overall_checkpoint.pth"))
    with pytest.raises(ValueError, match="synpref.transforms.rewards.mps convert"):
        pickled.load()
    assert main(["convert", str(tmp_path / "MPS_overall_checkpoint.pth"), str(tmp_path / "converted.safetensors")]) == 0
    ims = images()[:2]
    assert make(tiny, checkpoint=str(tmp_path / "converted.safetensors")).score_batch(ims, PROMPTS[:2]) == \
        pytest.approx(make(tiny).score_batch(ims, PROMPTS[:2]), rel=1e-6, abs=1e-7)
