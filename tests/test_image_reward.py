"""ImageReward: a tiny checkpoint with the release's key names, loaded through the reward, against a forward
pass written here from the architecture (BLIP timm ViT, BLIP ``med`` BERT with cross-attention, linear MLP)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from synpref.transforms.rewards import create_reward
from synpref.transforms.rewards.image_reward import rename_key
from synpref.transforms.rewards.preprocess import clip_center_crop

# ImageReward.py: self.mean, self.std (written out here, not imported, so a wrong constant fails)
IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072
WORDS = [f"word{i}" for i in range(60)] + ["cat", "dog", "red", "a", "on", "the"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
VD, VLAYERS, VHEADS, PATCH = 48, 2, 2, 32            # ViT width, depth, heads, patch (image 224: 7x7 + 1 tokens)
TD, TLAYERS, THEADS, TFF, MAXPOS = 32, 2, 2, 64, 40  # BERT width, depth, heads, FFN, positions
VOCAB_SIZE = len(VOCAB) + 2                          # + [DEC], [ENC] as BLIP's init_tokenizer


def release_state_dict(seed=0):
    """A state dict keyed as ImageReward.pt is (ImageReward -> blip / mlp), shapes from the architecture."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def t(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    def ln(name, d):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + t(d), t(d)

    def lin(name, fan_in, fan_out):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = t(fan_out, fan_in, std=fan_in ** -0.5), t(fan_out, std=0.05)

    v = "blip.visual_encoder."
    sd[v + "cls_token"], sd[v + "pos_embed"] = t(1, 1, VD), t(1, (224 // PATCH) ** 2 + 1, VD)
    sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"] = t(VD, 3, PATCH, PATCH, std=0.03), t(VD)
    for i in range(VLAYERS):
        b = f"{v}blocks.{i}."
        ln(b + "norm1", VD), lin(b + "attn.qkv", VD, 3 * VD), lin(b + "attn.proj", VD, VD)
        ln(b + "norm2", VD), lin(b + "mlp.fc1", VD, 4 * VD), lin(b + "mlp.fc2", 4 * VD, VD)
    ln(v + "norm", VD)

    x = "blip.text_encoder."
    sd[x + "embeddings.word_embeddings.weight"] = t(VOCAB_SIZE, TD, std=0.5)
    sd[x + "embeddings.position_embeddings.weight"] = t(MAXPOS, TD, std=0.5)
    sd[x + "embeddings.position_ids"] = torch.arange(MAXPOS).expand(1, -1).clone()  # a buffer in the release
    ln(x + "embeddings.LayerNorm", TD)
    for i in range(TLAYERS):
        b = f"{x}encoder.layer.{i}."
        for att, kv_width in (("attention", TD), ("crossattention", VD)):  # cross: keys / values from the ViT
            lin(f"{b}{att}.self.query", TD, TD)
            lin(f"{b}{att}.self.key", kv_width, TD), lin(f"{b}{att}.self.value", kv_width, TD)
            lin(f"{b}{att}.output.dense", TD, TD), ln(f"{b}{att}.output.LayerNorm", TD)
        lin(b + "intermediate.dense", TD, TFF), lin(b + "output.dense", TFF, TD), ln(b + "output.LayerNorm", TD)
    lin("blip.vision_proj", VD, 16), lin("blip.text_proj", TD, 16)  # contrastive heads: in the file, unused

    for idx, (i, o) in zip((0, 2, 4, 6, 7), ((TD, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        lin(f"mlp.layers.{idx}", i, o)
    sd["mlp.layers.7.bias"] = torch.tensor([0.8])  # keeps raw rewards away from the normalisation's fixed point
    return sd


# ---- the reference forward pass, written from BLIP's vit.py / med.py, on the release's key names ----

def _heads(x, n):
    b, t, d = x.shape
    return x.view(b, t, n, d // n).transpose(1, 2)


def ref_vit(sd, pixels):
    p = lambda k: sd["blip.visual_encoder." + k]  # noqa: E731
    h = F.conv2d(pixels, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=PATCH)
    h = torch.cat([p("cls_token").expand(len(pixels), -1, -1), h.flatten(2).transpose(1, 2)], 1) + p("pos_embed")
    for i in range(VLAYERS):
        b = f"blocks.{i}."
        y = F.layer_norm(h, (VD,), p(b + "norm1.weight"), p(b + "norm1.bias"), 1e-6)
        qkv = F.linear(y, p(b + "attn.qkv.weight"), p(b + "attn.qkv.bias"))  # timm: (3, heads, head_dim)
        q, k, v = (_heads(z, VHEADS) for z in qkv.chunk(3, -1))
        a = ((q @ k.transpose(-1, -2)) * (VD // VHEADS) ** -0.5).softmax(-1) @ v
        h = h + F.linear(a.transpose(1, 2).flatten(2), p(b + "attn.proj.weight"), p(b + "attn.proj.bias"))
        y = F.layer_norm(h, (VD,), p(b + "norm2.weight"), p(b + "norm2.bias"), 1e-6)
        y = F.gelu(F.linear(y, p(b + "mlp.fc1.weight"), p(b + "mlp.fc1.bias")))
        h = h + F.linear(y, p(b + "mlp.fc2.weight"), p(b + "mlp.fc2.bias"))
    return F.layer_norm(h, (VD,), p("norm.weight"), p("norm.bias"), 1e-6)


def ref_text(sd, ids, mask, image_embeds):
    p = lambda k: sd["blip.text_encoder." + k]  # noqa: E731
    lin = lambda x, k: F.linear(x, p(k + ".weight"), p(k + ".bias"))  # noqa: E731
    norm = lambda x, k: F.layer_norm(x, (TD,), p(k + ".weight"), p(k + ".bias"), 1e-12)  # noqa: E731

    def attention(prefix, h, kv, additive_mask):
        q, k, v = (_heads(lin(src, f"{prefix}.self.{n}"), THEADS)
                   for n, src in (("query", h), ("key", kv), ("value", kv)))
        scores = (q @ k.transpose(-1, -2)) / (TD // THEADS) ** 0.5 + additive_mask
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return norm(lin(ctx, f"{prefix}.output.dense") + h, f"{prefix}.output.LayerNorm")

    h = p("embeddings.word_embeddings.weight")[ids] + p("embeddings.position_embeddings.weight")[: ids.shape[1]]
    h = norm(h, "embeddings.LayerNorm")
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med's get_extended_attention_mask
    for i in range(TLAYERS):
        b = f"encoder.layer.{i}."
        h = attention(b + "attention", h, h, self_mask)
        h = attention(b + "crossattention", h, image_embeds, 0.0)  # all-ones image mask
        h = norm(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm")
    return h


def ref_mlp(sd, x):
    for idx in (0, 2, 4, 6, 7):  # Linear, Dropout, ..., Linear, Linear: no activations in the release
        x = F.linear(x, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return x.squeeze(-1)


def ref_tokens(prompts):
    """bert-base-uncased style on a vocabulary of whole words: [CLS] words[:33] [SEP], padded to 35."""
    ids = [[2] + [VOCAB.index(w) for w in p.lower().split()][:33] + [3] for p in prompts]
    mask = [[1] * len(r) + [0] * (35 - len(r)) for r in ids]
    return torch.tensor([r + [0] * (35 - len(r)) for r in ids]), torch.tensor(mask)


def imagereward_transform(images):
    """ImageReward.py's _transform(224), with torchvision as the release uses it."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    tf = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                  lambda im: im.convert("RGB"), ToTensor(),
                  Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return torch.stack([tf(im) for im in images])


def reference_scores(sd, images, prompts, normalise=True):
    with torch.no_grad():
        ids, mask = ref_tokens(prompts)
        raw = ref_mlp(sd, ref_text(sd, ids, mask, ref_vit(sd, imagereward_transform(images)))[:, 0])
    return ((raw - IR_MEAN) / IR_STD if normalise else raw).tolist()


def sample_images():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    ramp = np.linspace(0, 255, 260 * 180 * 3).reshape(260, 180, 3).astype(np.uint8)
    return [noise, Image.fromarray(ramp), Image.new("RGB", (224, 224), (200, 40, 90))]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The release's files, tiny: ImageReward.pt (pickled state dict), its safetensors conversion,
    med_config.json (with the release's stale encoder_width 768), a BertTokenizer folder, a ViT config."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("image_reward")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": TD, "initializer_range": 0.02, "intermediate_size": TFF,
           "layer_norm_eps": 1e-12, "max_position_embeddings": MAXPOS, "model_type": "bert",
           "num_attention_heads": THEADS, "num_hidden_layers": TLAYERS, "pad_token_id": 0, "type_vocab_size": 2,
           "vocab_size": VOCAB_SIZE, "encoder_width": 768, "add_cross_attention": True}
    (root / "med_config.json").write_text(json.dumps(med))
    (root / "vision.json").write_text(json.dumps(dict(hidden_size=VD, intermediate_size=4 * VD, patch_size=PATCH,
                                                      num_hidden_layers=VLAYERS, num_attention_heads=VHEADS)))
    sd = release_state_dict()
    torch.save(sd, root / "ImageReward.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "ImageReward.safetensors"))
    params = {"checkpoint": str(root / "ImageReward.pt"), "med_config": str(root / "med_config.json"),
              "tokenizer": str(root / "tokenizer"), "vision_config": str(root / "vision.json"), "device": "cpu"}
    return {"root": root, "sd": sd, "params": params}


@pytest.fixture(scope="module")
def loaded(release):
    reward = create_reward("image_reward", release["params"])
    reward.load()
    return reward


def test_rename_key_maps_release_names_to_transformers_modules():
    cases = {
        "blip.visual_encoder.cls_token": "vision.embeddings.class_embedding",
        "blip.visual_encoder.pos_embed": "vision.embeddings.position_embedding",
        "blip.visual_encoder.patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
        "blip.visual_encoder.blocks.23.norm1.bias": "vision.encoder.layers.23.layer_norm1.bias",
        "blip.visual_encoder.blocks.0.attn.qkv.weight": "vision.encoder.layers.0.self_attn.qkv.weight",
        "blip.visual_encoder.blocks.5.attn.proj.bias": "vision.encoder.layers.5.self_attn.projection.bias",
        "blip.visual_encoder.blocks.5.norm2.weight": "vision.encoder.layers.5.layer_norm2.weight",
        "blip.visual_encoder.blocks.7.mlp.fc2.weight": "vision.encoder.layers.7.mlp.fc2.weight",
        "blip.visual_encoder.norm.weight": "vision.post_layernorm.weight",
        "blip.text_encoder.embeddings.word_embeddings.weight": "text.embeddings.word_embeddings.weight",
        "blip.text_encoder.embeddings.LayerNorm.bias": "text.embeddings.LayerNorm.bias",
        "blip.text_encoder.encoder.layer.11.crossattention.self.key.weight":
            "text.encoder.layer.11.crossattention.self.key.weight",
        "blip.text_encoder.encoder.layer.0.attention.output.LayerNorm.weight":
            "text.encoder.layer.0.attention.output.LayerNorm.weight",
        "blip.text_encoder.encoder.layer.3.output.dense.bias": "text.encoder.layer.3.output.dense.bias",
        "mlp.layers.0.weight": "head.0.weight",
        "mlp.layers.7.bias": "head.7.bias",
        # in the release, unused by scoring
        "blip.text_encoder.embeddings.position_ids": "",
        "blip.vision_proj.weight": "",
        "blip.text_proj.bias": "",
        # not ImageReward
        "blip.text_encoder.pooler.dense.weight": None,
        "blip.text_encoder.embeddings.token_type_embeddings.weight": None,
        "mlp.layers.1.weight": None,
        "blip.itm_head.weight": None,
    }
    assert {k: rename_key(k) for k in cases} == cases


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_scores_equal_an_independent_forward_of_the_release_weights(release, fmt):
    params = {**release["params"], "checkpoint": str(release["root"] / f"ImageReward.{fmt}")}
    reward = create_reward("image_reward", params)
    reward.load()
    images = sample_images()
    prompts = ["a red cat", "the dog on a word3 word7", "word1 word2 word3 word4 word5"]
    got = reward.score_batch(images, prompts)
    want = reference_scores(release["sd"], images, prompts)
    raw = reference_scores(release["sd"], images, prompts, normalise=False)
    assert got == pytest.approx(want, rel=0, abs=1e-5)  # the modules do the same arithmetic
    assert all(abs(w - r) > 0.05 for w, r in zip(want, raw))  # the normalisation constants matter here
    assert len(set(round(s, 4) for s in got)) == 3
    # one image at a time (as the original scores) gives the same numbers as the batch
    assert [reward.score_batch([im], [p])[0] for im, p in zip(images, prompts)] == pytest.approx(got, abs=1e-5)


def test_prompts_are_truncated_at_35_tokens(loaded, release):
    long_words = [f"word{i}" for i in range(50)]
    image = sample_images()[0]
    prompts = [" ".join(long_words), " ".join(long_words[:33]), " ".join(long_words[:33] + ["cat"] * 10),
               " ".join(long_words[:20])]
    scores = loaded.score_batch([image] * 4, prompts)
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) and scores[2] == pytest.approx(scores[1], abs=1e-6)
    assert abs(scores[3] - scores[1]) > 1e-4  # the words do matter before the cut
    assert scores[:1] == pytest.approx(reference_scores(release["sd"], [image], prompts[:1]), rel=0, abs=1e-5)
    assert loaded._tokenizer(prompts[0], padding="max_length", truncation=True,
                             max_length=35, return_tensors="pt")["input_ids"].shape == (1, 35)


def test_preprocessing_is_imagereward_transform_and_shared_with_clip_224(loaded):
    images = sample_images()
    assert torch.equal(clip_center_crop(images), imagereward_transform(images))
    # the key clip_score / laion_aesthetic give an OpenAI-CLIP model: one resize per image for all of them
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from synpref.transforms.rewards.clip_score import center_crop_key

    assert loaded.preprocess_key() == center_crop_key({"size": 224, "mean": OPENAI_DATASET_MEAN,
                                                       "std": OPENAI_DATASET_STD})
    assert torch.equal(loaded.preprocess(images), clip_center_crop(images))


def test_half_precision_is_for_cuda_only(release, loaded):
    images, prompts = sample_images()[:2], ["a red cat", "word9 dog"]
    reward = create_reward("image_reward", {**release["params"], "dtype": "bfloat16"})
    with pytest.warns(UserWarning, match="image_reward: dtype bfloat16 is for GPUs; running in float32 on cpu"):
        reward.load()
    assert reward.score_batch(images, prompts) == loaded.score_batch(images, prompts)


def test_a_checkpoint_that_does_not_fit_fails_in_one_line_naming_the_keys(release):
    sd = dict(release["sd"])
    sd["blip.itm_head.weight"] = torch.zeros(2, TD)
    del sd["blip.visual_encoder.blocks.1.mlp.fc1.bias"]
    sd["mlp.layers.4.weight"] = torch.zeros(64, 129)
    bad = release["root"] / "bad.pt"
    torch.save(sd, bad)
    reward = create_reward("image_reward", {**release["params"], "checkpoint": str(bad)})
    with pytest.raises(ValueError) as err:
        reward.load()
    msg = str(err.value)
    assert "\n" not in msg
    assert "unmatched keys: blip.itm_head.weight" in msg
    assert "missing weights: vision.encoder.layers.1.mlp.fc1.bias" in msg
    assert "mlp.layers.4.weight (64, 129) != (64, 128)" in msg


def test_files_params_and_required_paths(release):
    reward = create_reward("image_reward", release["params"])
    names = ("checkpoint", "med_config", "tokenizer", "vision_config")
    assert reward.files() == {k: release["params"][k] for k in names}
    assert create_reward("image_reward", {"checkpoint": "a.pt", "med_config": "m.json"}).files() == {
        "checkpoint": "a.pt", "med_config": "m.json", "tokenizer": "bert-base-uncased"}
    with pytest.raises(ValueError, match="'checkpoint'.*'med_config'.*required"):
        create_reward("image_reward", {"checkpoint": "a.pt"})
    with pytest.raises(ValueError, match="dtype"):
        create_reward("image_reward", {"checkpoint": "a.pt", "med_config": "m.json", "dtype": "float64"})
