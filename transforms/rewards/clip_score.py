"""CLIPScore (Hessel et al. 2021) with any open_clip model, and the open_clip loading the CLIP-family rewards share.

``variant="clipscore"`` is the paper's 2.5 * max(cos, 0); ``variant="cosine"``
is the raw cosine, which keeps order information where the clamp would tie
(torchmetrics reports max(100 cos, 0): same order as ``clipscore``).

Preprocessing is shared: when the loaded model's own preprocess config is CLIP's recipe (shortest side,
bicubic, centre crop; every OpenAI / LAION ViT is), ``preprocess_key()`` is
``("clip_center_crop", size, mean, std)`` and ``preprocess`` is ``preprocess.clip_center_crop``, bit-exact
with open_clip's transform, so an ensemble of CLIP-224 rewards (``clip_score``, ``laion_aesthetic``) resizes
each image once. Other recipes (``squash``, ``longest``) use open_clip's own transform under their own key.

The helpers below (``open_clip_files``, ``load_open_clip``, ``resolve_dtype``) are used by ``hpsv2`` and
``laion_aesthetic`` too, so all open_clip rewards load checkpoints the same, safe way.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Hashable, Sequence

from PIL import Image

from .base import Reward, register_reward
from ..model_io import local_copy, pick_device

DTYPES = ("float32", "float16", "bfloat16")


def check_dtype(reward: str, dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{reward}: dtype must be one of {list(DTYPES)}, got {dtype!r}")


def resolve_dtype(reward: str, dtype: str, device: str):
    """The torch dtype to run in: half precision on CUDA only; on any other device float32, with a warning."""
    import torch

    check_dtype(reward, dtype)
    if dtype != "float32" and not str(device).startswith("cuda"):
        warnings.warn(f"{reward}: dtype {dtype} is for GPUs; running in float32 on {device}", stacklevel=3)
        dtype = "float32"
    return getattr(torch, dtype)


def needs_quick_gelu(model_name: str, pretrained: str) -> bool:
    """True when the pretrained tag was trained with QuickGELU but the architecture config lacks it.

    open_clip 3.x only *warns* on this mismatch (``ViT-L-14`` + ``openai``) and builds the model with
    plain GELU, which changes every embedding; OpenAI's weights need QuickGELU.
    """
    import open_clip

    if not pretrained or model_name.startswith(("hf-hub:", "local-dir:")):
        return False
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    model_cfg = open_clip.get_model_config(model_name) or {}
    return bool(tag_cfg.get("quick_gelu", False)) and not model_cfg.get("quick_gelu", False)


def open_clip_files(model_name: str, pretrained: str, checkpoint: str, model_config: str) -> dict[str, str]:
    """The locations an open_clip reward loads. A pretrained tag names the hub repo open_clip downloads it from."""
    files = {}
    if model_config:
        files["model_config"] = model_config
    if checkpoint:
        files["checkpoint"] = checkpoint
    if model_name.startswith("hf-hub:"):
        files["model"] = model_name
    elif pretrained:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if cfg.get("hf_hub"):
            files["pretrained"] = "hf-hub:" + cfg["hf_hub"].rstrip("/")
        elif cfg.get("url"):
            files["pretrained"] = cfg["url"]
        else:  # a file path given as the tag (open_clip accepts one)
            files["pretrained"] = pretrained
    return files


def load_open_clip(reward: str, model_name: str, pretrained: str, checkpoint: str, model_config: str,
                   device: str, dtype, cache_dir: str = "", checkpoint_key: str = ""):
    """(model in eval mode on ``device`` / ``dtype``, tokenizer, preprocess cfg dict).

    A ``checkpoint`` is read with ``checkpoints.load_state_dict`` (safetensors, or a weights-only pickle;
    whole pickled modules are refused with the conversion command) into a model created *without*
    pretrained weights, so nothing is downloaded; the state dict gets the same fix-ups open_clip's own
    ``load_checkpoint`` applies, then loads strictly.
    """
    import open_clip

    if model_config:
        open_clip.add_model_config(local_copy(model_config, cache_dir))
    if checkpoint:
        from ..checkpoints import load_state_dict

        state = load_state_dict(checkpoint, cache_dir, key=checkpoint_key)
        # pretrained=None: no download for built-in names; hub / local-dir names (open_clip >= 3) need
        # load_weights=False to skip the weights their config points at
        skip = {"load_weights": False} if model_name.startswith(("hf-hub:", "local-dir:")) else {}
        model = open_clip.create_model(model_name, pretrained=None, device="cpu", cache_dir=cache_dir or None, **skip)
        _load_open_clip_state(model, state, f"{reward}: {checkpoint}")
    else:
        model = open_clip.create_model(model_name, pretrained=pretrained or None, device="cpu",
                                       force_quick_gelu=needs_quick_gelu(model_name, pretrained),
                                       cache_dir=cache_dir or None)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    return model, tokenizer, cfg


def _load_open_clip_state(model, state: dict, what: str) -> None:
    """``model.load_state_dict(state, strict=True)`` after open_clip's ``load_checkpoint`` fix-ups."""
    import torch
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state = dict(state)
    try:  # third-party layouts (MobileCLIP), open_clip >= 2.26
        from open_clip.convert import convert_state_dict

        state = convert_state_dict(model, state)
    except ImportError:
        pass
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and getattr(model, key, None) is not None and model.get_parameter(key).ndim != state[key].ndim:
            state[key] = state[key].reshape(model.get_parameter(key).shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ValueError(f"{what}: weights do not fit the architecture ({' '.join(first[:2])[:300]})") from None


def center_crop_key(cfg: dict[str, Any]) -> Hashable | None:
    """``("clip_center_crop", size, mean, std)`` when open_clip's preprocess cfg is CLIP's recipe, else None."""
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            return None
        size = size[0]
    if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") != "bicubic":
        return None
    return ("clip_center_crop", int(size), tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"]))


def encode_normalised(model, pixels, tokens=None):
    """L2-normalised float32 image (and text) features, one batched forward each."""
    import torch

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels.to(device=device, dtype=dtype)).float(), dim=-1)
        if tokens is None:
            return img
        txt = torch.nn.functional.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
    return img, txt


@register_reward("clip_score")
class ClipScore(Reward):
    """Args:
    model: open_clip architecture name (``ViT-B-32``, ``ViT-H-14``...) or ``hf-hub:<repo>``.
    pretrained: open_clip pretrained tag (``openai``, ``laion2b_s32b_b79k``); used when no checkpoint.
        OpenAI tags get QuickGELU as they were trained with (open_clip itself only warns).
    checkpoint: a state-dict file (.safetensors / .pt / .bin), local or fsspec URL. For OpenAI weights in a
        file, name the ``-quickgelu`` architecture (``ViT-B-32-quickgelu``).
    model_config: a JSON architecture file to register first (custom architectures).
    dtype: ``float32`` (default); ``float16`` / ``bfloat16`` on CUDA only (elsewhere float32, with a warning).
    """

    version = "1"

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "", checkpoint: str = "",
                 model_config: str = "", variant: str = "clipscore", device: str = "auto",
                 cache_dir: str = "", dtype: str = "float32"):
        if variant not in ("clipscore", "cosine"):
            raise ValueError(f"clip_score variant must be 'clipscore' or 'cosine', got {variant!r}")
        if pretrained and checkpoint:
            raise ValueError("clip_score: give either 'pretrained' (an open_clip tag) or 'checkpoint' (a file), not both")
        check_dtype("clip_score", dtype)
        self.model_name, self.pretrained, self.checkpoint = model, pretrained, checkpoint
        self.model_config, self.variant, self.device, self.cache_dir = model_config, variant, device, cache_dir
        self.dtype = dtype
        self._model = None

    def params(self):
        return {"model": self.model_name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
                "variant": self.variant, "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        return open_clip_files(self.model_name, self.pretrained, self.checkpoint, self.model_config)

    def load(self) -> None:
        device = pick_device(self.device)
        torch_dtype = resolve_dtype("clip_score", self.dtype, device)
        model, tokenizer, cfg = load_open_clip("clip_score", self.model_name, self.pretrained, self.checkpoint,
                                               self.model_config, device, torch_dtype, self.cache_dir)
        self._tokenizer, self._cfg, self._device = tokenizer, cfg, device
        self._key = center_crop_key(cfg)
        if self._key is None:  # not CLIP's crop recipe: open_clip's own transform, under its own key
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
            self._key = ("open_clip_transform", json.dumps(cfg, sort_keys=True, default=str))
        self._model = model

    def preprocess_key(self) -> Hashable:
        """Known from the loaded model's preprocess config (loads on first call)."""
        if self._model is None:
            self.load()
        return self._key

    def preprocess(self, images: Sequence[Image.Image]):
        import torch

        from .preprocess import clip_center_crop

        key = self.preprocess_key()
        if key[0] == "clip_center_crop":
            return clip_center_crop(images, size=key[1], mean=key[2], std=key[3])
        return torch.stack([self._transform(im.convert("RGB")) for im in images])

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        if self._model is None:
            self.load()
        img, txt = encode_normalised(self._model, pixels, self._tokenizer(list(prompts)))
        cos = (img * txt).sum(-1)
        if self.variant == "clipscore":
            cos = 2.5 * cos.clamp(min=0)
        return [float(c) for c in cos.cpu()]
