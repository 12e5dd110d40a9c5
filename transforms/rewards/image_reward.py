"""ImageReward v1.0 (Xu et al. 2023, THUDM/ImageReward), loaded into clean transformers modules.

How it is built, its checkpoint format and how it was checked: docs/rewards.md, `image_reward`.
"""
from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence

from PIL import Image

from .base import Reward, register_reward
from .clip_score import check_dtype, resolve_dtype
from ..model_io import local_copy, pick_device

# ImageReward.py's _transform(224): Resize(224, bicubic), CenterCrop(224), these mean / std = CLIP's recipe.
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35
# The release's MLP is nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear):
# its linear layers are mlp.layers.0, 2, 4, 6, 7.
MLP_WIDTHS = (1024, 128, 64, 16, 1)

# BLIP's create_vit('large', 224): ViT-L/16, pre-norm blocks, timm LayerNorm eps 1e-6, mlp_ratio 4,
# exact GELU, qkv with bias. ``vision_config`` (a JSON of BlipVisionConfig fields) overrides these.
VIT_L16 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
               image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, attention_dropout=0.0)

# Release keys that scoring does not use: BLIP's contrastive projections and a position-id buffer.
IGNORED_KEYS = re.compile(r"^blip\.(vision_proj|text_proj)\.(weight|bias)$"
                          r"|^blip\.text_encoder\.embeddings\.position_ids$")

_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_RULES = [
    # ViT (timm layout) -> BlipVisionModel, under ``vision.``
    (re.compile(r"^blip\.visual_encoder\.cls_token$"), lambda m: "vision.embeddings.class_embedding"),
    (re.compile(r"^blip\.visual_encoder\.pos_embed$"), lambda m: "vision.embeddings.position_embedding"),
    (re.compile(r"^blip\.visual_encoder\.patch_embed\.proj\.(weight|bias)$"),
     lambda m: f"vision.embeddings.patch_embedding.{m[1]}"),
    (re.compile(r"^blip\.visual_encoder\.blocks\.(\d+)\."
                r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"),
     lambda m: f"vision.encoder.layers.{m[1]}.{_VIT_BLOCK[m[2]]}.{m[3]}"),
    (re.compile(r"^blip\.visual_encoder\.norm\.(weight|bias)$"), lambda m: f"vision.post_layernorm.{m[1]}"),
    # med BertModel -> BlipTextModel (the same sub-names), under ``text.``
    (re.compile(r"^blip\.text_encoder\.(embeddings\.(?:word_embeddings|position_embeddings)\.weight)$"),
     lambda m: f"text.{m[1]}"),
    (re.compile(r"^blip\.text_encoder\.(embeddings\.LayerNorm\.(?:weight|bias))$"), lambda m: f"text.{m[1]}"),
    (re.compile(r"^blip\.text_encoder\.(encoder\.layer\.\d+\.(?:attention|crossattention)\."
                r"(?:self\.(?:query|key|value)|output\.dense|output\.LayerNorm)\.(?:weight|bias))$"),
     lambda m: f"text.{m[1]}"),
    (re.compile(r"^blip\.text_encoder\.(encoder\.layer\.\d+\.(?:intermediate\.dense|output\.dense|output\.LayerNorm)"
                r"\.(?:weight|bias))$"), lambda m: f"text.{m[1]}"),
    # MLP head: nn.Sequential indices kept
    (re.compile(r"^mlp\.layers\.([02467])\.(weight|bias)$"), lambda m: f"head.{m[1]}.{m[2]}"),
]


def rename_key(key: str) -> Optional[str]:
    """The module key for a key of the released ImageReward state dict.

    Returns ``""`` for release keys that scoring ignores and ``None`` for keys that match nothing.
    """
    if IGNORED_KEYS.match(key):
        return ""
    for pattern, target in _RULES:
        m = pattern.match(key)
        if m:
            return target(m)
    return None


def _short(keys, n=8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def convert_state_dict(state: dict, expected: dict, where: str = "checkpoint") -> dict:
    """Rename a released state dict to the module's keys; ``expected`` maps module key -> tensor (for shapes).

    Raises a one-line ValueError naming every unmatched, missing or mis-shaped key.
    """
    out, unmatched, shapes, misfit = {}, [], [], set()
    for key, value in state.items():
        new = rename_key(key)
        if new == "":
            continue
        if new is None or new not in expected:
            unmatched.append(key)
        elif tuple(value.shape) != tuple(expected[new].shape):
            shapes.append(f"{key} {tuple(value.shape)} != {tuple(expected[new].shape)}")
            misfit.add(new)
        else:
            out[new] = value
    missing = [k for k in expected if k not in out and k not in misfit]
    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} unmatched keys: {_short(unmatched)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches: {_short(shapes, 4)}")
    if missing:
        problems.append(f"{len(missing)} missing weights: {_short(missing)}")
    if problems:
        raise ValueError(f"image_reward: {where} does not fit the ImageReward architecture "
                         f"(check med_config / vision_config): {'; '.join(problems)}")
    return out


def text_config_from_med(med: dict, encoder_hidden_size: int, tokenizer=None):
    """A BlipTextConfig equal to BLIP's ``med`` BertConfig. As BLIP_Pretrain does, the cross-attention
    width is the ViT's width: the release's med_config.json says ``encoder_width: 768`` for a 1024-wide ViT-L."""
    from transformers import BlipTextConfig

    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"image_reward: med_config position_embedding_type "
                         f"{med['position_embedding_type']!r} is not supported (the release uses 'absolute')")
    if not med.get("add_cross_attention", True):
        raise ValueError("image_reward: med_config has add_cross_attention false; ImageReward needs cross-attention")
    special = {}
    if tokenizer is not None:
        special = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
                       eos_token_id=tokenizer.sep_token_id)
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_hidden_size,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=med.get("pad_token_id", 0),
        is_decoder=True,  # BlipTextModel builds its cross-attention layers only when is_decoder; run bidirectionally
        use_cache=False, **special)


def build_network(vision_config, text_config):
    """The modules, keyed ``vision.*`` (BlipVisionModel), ``text.*`` (BlipTextModel), ``head.*`` (the MLP)."""
    import torch
    from transformers import BlipTextModel, BlipVisionModel

    layers, width = [], text_config.hidden_size
    for i, out in enumerate(MLP_WIDTHS):
        layers.append(torch.nn.Linear(width, out))
        if i < 3:
            layers.append(torch.nn.Dropout(0.0))  # placeholders keep the release's Sequential indices
        width = out
    return torch.nn.ModuleDict({
        "vision": BlipVisionModel(vision_config),
        "text": BlipTextModel(text_config, add_pooling_layer=False),
        "head": torch.nn.Sequential(*layers),
    })


@register_reward("image_reward")
class ImageReward(Reward):
    """Args:
    checkpoint: ``ImageReward.pt`` (pickled state dict, loaded weights-only) or its ``.safetensors``
        conversion (``python -m synpref.transforms.checkpoints ImageReward.pt ImageReward.safetensors``).
    med_config: the release's ``med_config.json`` (BERT config of the text encoder).
    tokenizer: a BertTokenizer folder (or hub id), default ``bert-base-uncased``.
    vision_config: optional JSON of ``BlipVisionConfig`` fields over the release's ViT-L/16 at 224.
    dtype: ``float32`` (default), ``float16`` or ``bfloat16`` for the encoders on CUDA (float32 elsewhere,
        with a warning); the MLP runs in float32, as the original casts the [CLS] feature to float.
    max_batch: images per forward pass (0: all images of a call at once).
    """

    version = "1"

    def __init__(self, checkpoint: str = "", med_config: str = "", tokenizer: str = "bert-base-uncased",
                 vision_config: str = "", dtype: str = "float32", device: str = "auto", max_batch: int = 0,
                 cache_dir: str = ""):
        if not checkpoint or not med_config:
            raise ValueError("image_reward: 'checkpoint' (ImageReward.pt or .safetensors) and 'med_config' "
                             "(med_config.json), both from the THUDM/ImageReward model repo, are required")
        check_dtype("image_reward", dtype)
        if int(max_batch) < 0:
            raise ValueError(f"image_reward: max_batch must be >= 0, got {max_batch}")
        self.checkpoint, self.med_config, self.tokenizer = checkpoint, med_config, tokenizer
        self.vision_config, self.dtype, self.device = vision_config, dtype, device
        self.max_batch, self.cache_dir = int(max_batch), cache_dir
        self._net, self._vision = None, None

    def params(self):
        return {"checkpoint": self.checkpoint, "med_config": self.med_config, "tokenizer": self.tokenizer,
                "vision_config": self.vision_config, "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        out = {"checkpoint": self.checkpoint, "med_config": self.med_config, "tokenizer": self.tokenizer}
        if self.vision_config:
            out["vision_config"] = self.vision_config
        return out

    def _vision_fields(self) -> dict[str, Any]:
        if self._vision is None:
            fields = dict(VIT_L16)
            if self.vision_config:
                with open(local_copy(self.vision_config, self.cache_dir)) as f:
                    fields.update(json.load(f))
            self._vision = fields
        return self._vision

    def load(self) -> None:
        import torch
        from transformers import BertTokenizer, BlipVisionConfig

        from ..checkpoints import load_state_dict

        tokenizer = BertTokenizer.from_pretrained(local_copy(self.tokenizer, self.cache_dir))
        # As BLIP's init_tokenizer: the two special tokens that make the vocabulary 30522 + 2 = 30524.
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        with open(local_copy(self.med_config, self.cache_dir)) as f:
            med = json.load(f)
        if len(tokenizer) > med["vocab_size"]:
            raise ValueError(f"image_reward: tokenizer {self.tokenizer} has {len(tokenizer)} tokens with [DEC]/[ENC], "
                             f"more than med_config's vocab_size {med['vocab_size']}")
        vision = BlipVisionConfig(**self._vision_fields())
        net = build_network(vision, text_config_from_med(med, vision.hidden_size, tokenizer))
        state = load_state_dict(self.checkpoint, self.cache_dir)
        net.load_state_dict(convert_state_dict(state, net.state_dict(), self.checkpoint), strict=True)
        device = pick_device(self.device)
        dtype = resolve_dtype("image_reward", self.dtype, device)
        net["vision"].to(device=device, dtype=dtype)
        net["text"].to(device=device, dtype=dtype)
        net["head"].to(device=device, dtype=torch.float32)
        net.eval()
        self._net, self._tokenizer, self._device, self._dtype = net, tokenizer, device, dtype

    def preprocess_key(self):
        """``("clip_center_crop", 224, mean, std)``: the key of ``clip_score`` / ``laion_aesthetic`` with OpenAI
        CLIP's recipe, so an ensemble resizes each image once for all of them."""
        return ("clip_center_crop", int(self._vision_fields()["image_size"]), PIXEL_MEAN, PIXEL_STD)

    def preprocess(self, images: Sequence[Image.Image]):
        from .preprocess import clip_center_crop

        _, size, mean, std = self.preprocess_key()
        return clip_center_crop(images, size=size, mean=mean, std=std)

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        import torch

        if self._net is None:
            self.load()
        if len(pixels) != len(prompts):
            raise ValueError(f"image_reward: {len(pixels)} images but {len(prompts)} prompts")
        step = self.max_batch or max(len(prompts), 1)
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), step):
                out.extend(self._score(pixels[start:start + step], list(prompts[start:start + step])))
        return out

    def _score(self, pixels, prompts: list[str]) -> list[float]:
        import torch

        tokens = self._tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                                 return_tensors="pt")
        image_embeds = self._net["vision"](pixel_values=pixels.to(self._device, self._dtype)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        hidden = self._net["text"](
            input_ids=tokens["input_ids"].to(self._device), attention_mask=tokens["attention_mask"].to(self._device),
            encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
        reward = self._net["head"](hidden[:, 0, :].float()).squeeze(-1)
        reward = (reward - MEAN) / STD
        return [float(r) for r in reward.cpu()]
