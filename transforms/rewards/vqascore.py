"""VQAScore (Lin et al. 2024) with CLIP-FlanT5: how likely a VQA model answers "Yes" to "does this show the prompt?".

How it is built, its checkpoint format and how it was checked: docs/rewards.md, `vqascore`.
"""
from __future__ import annotations

import re
import string
import warnings
from typing import Any, Hashable, Optional, Sequence

from PIL import Image

from .base import Reward, register_reward
from ..model_io import local_copy, pick_device

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
IMAGE_MARKER = "<image>"
CONTEXT_LEN = 2048
DEFAULT_QUESTION = 'Does this figure show "{}"? Please answer yes or no.'
DEFAULT_ANSWER = "Yes"
DTYPES = ("auto", "float32", "bfloat16")
REDUCTIONS = ("mean", "sum")
_IMAGE = -200  # placeholder id for the image position in a token list


def chat_prompt(question: str) -> str:
    """The ``t5_chat`` conversation the released CLIP-FlanT5 models were trained with."""
    return f"{SYSTEM_MSG} USER: {IMAGE_MARKER}\n{question} ASSISTANT: "


def expand2square_clip(images: Sequence[Image.Image], size: int = 336, mean=CLIP_MEAN,
                       std=CLIP_STD):
    """CLIP-FlanT5's recipe: pad to a square with the mean colour at the image's own resolution (the image
    centred, offsets floored), then CLIP's processor: bicubic resize to ``size``, CLIP mean/std.

    Returns a float32 tensor [N, 3, size, size].
    """
    import numpy as np
    import torch

    fill = tuple(int(m * 255) for m in mean)
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), fill)
            canvas.paste(im, ((side - w) // 2, (side - h) // 2))
            im = canvas
        if im.size != (size, size):  # a square: the shortest-edge resize is to (size, size), the crop a no-op
            im = im.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im, dtype=np.uint8))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _check_template(template: str, what: str) -> str:
    """A ``str.format`` template with at most one positional field ``{}`` (the prompt)."""
    if not isinstance(template, str):
        raise ValueError(f"vqascore: {what} must be a string, got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        template.format("x")
    except (ValueError, IndexError, KeyError) as err:
        raise ValueError(f"vqascore: {what} must be a format string with at most one '{{}}' field ({err}): "
                         f"{template!r}") from None
    if len(fields) > 1 or any(f not in ("", "0") for f in fields):
        raise ValueError(f"vqascore: {what} must have at most one '{{}}' field (the prompt): {template!r}")
    if IMAGE_MARKER in template:
        raise ValueError(f"vqascore: {what} must not contain {IMAGE_MARKER!r} (the image goes in once, "
                         f"before the question)")
    return template


def map_release_keys(state: dict, t5_keys: set, tie_lm_head: bool) -> tuple[dict, dict, dict, list]:
    """Split a CLIP-FlanT5 release state dict into (vision, projector, t5) dicts under this module's names.

    Returns also the keys that match nothing. See the module docstring for the map.
    """
    vision, projector, t5, unmatched = {}, {}, {}, []
    alias = None
    for key, value in state.items():
        k = key.removeprefix("module.").removeprefix("model.")
        if k.startswith("vision_tower.vision_tower."):
            vision[k[len("vision_tower.vision_tower."):]] = value
        elif m := re.fullmatch(r"mm_projector\.([02])\.(weight|bias)", k):
            projector[f"linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"] = value
        elif k == "embed_tokens.weight":  # CLIPT5's self.embed_tokens = encoder.embed_tokens (= shared)
            alias = value
        elif k in t5_keys:
            t5[k] = value
        else:
            unmatched.append(key)
    embed = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    source = next((t5[k] for k in embed if k in t5), alias)
    if source is not None:
        for k in embed:
            if k in t5_keys:
                t5.setdefault(k, source)
        if tie_lm_head and "lm_head.weight" in t5_keys:
            t5.setdefault("lm_head.weight", source)
    return vision, projector, t5, unmatched


def _projector_class():
    import torch

    class Projector(torch.nn.Module):
        """``mlp2x_gelu``: Linear(vision hidden, d_model), exact GELU, Linear(d_model, d_model)."""

        def __init__(self, vision_hidden: int, d_model: int):
            super().__init__()
            self.linear_1 = torch.nn.Linear(vision_hidden, d_model)
            self.linear_2 = torch.nn.Linear(d_model, d_model)

        def forward(self, x):
            return self.linear_2(torch.nn.functional.gelu(self.linear_1(x)))

    return Projector


def _load_strict(module, state: dict, what: str, location: str) -> None:
    """load_state_dict with missing/unexpected keys and shape mismatches reported in one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shapes)):
            if items:
                parts.append(f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        raise ValueError(f"vqascore: {location}: {what} weights do not fit: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


@register_reward("vqascore")
class VQAScore(Reward):
    """VQAScore with CLIP-FlanT5; see the module docstring.

    Args:
        checkpoint: the release's state dict (``.bin`` / ``.pt`` pickled, read weights-only, or
            ``.safetensors``); local path or fsspec URL. Required.
        t5_config: folder / hub id with FlanT5's ``config.json`` (default ``google/flan-t5-xl``).
        tokenizer: FlanT5 tokenizer folder / hub id (default ``google/flan-t5-xl``).
        vision_tower: CLIP ViT-L/14-336 folder / hub id (config; weights if the checkpoint lacks them).
        question_template / answer_template: ``str.format`` strings with at most one ``{}`` (the prompt).
        reduction: ``mean`` (default, the original's score) or ``sum`` over answer-token log-probs.
        image_size: the processor's size (336 for the release; must equal the tower's image_size).
        batch_size: images per forward pass. device: ``auto`` = next GPU, else CPU. dtype: see docstring.
    """

    version = "1"

    def __init__(self, checkpoint: str = "", t5_config: str = "google/flan-t5-xl",
                 tokenizer: str = "google/flan-t5-xl", vision_tower: str = "openai/clip-vit-large-patch14-336",
                 question_template: str = DEFAULT_QUESTION, answer_template: str = DEFAULT_ANSWER,
                 reduction: str = "mean", image_size: int = 336, batch_size: int = 8, device: str = "auto",
                 dtype: str = "auto", cache_dir: str = ""):
        if not checkpoint:
            raise ValueError("vqascore: 'checkpoint' is required (e.g. clip-flant5-xl's pytorch_model.bin)")
        if not t5_config or not tokenizer or not vision_tower:
            raise ValueError("vqascore: 't5_config', 'tokenizer' and 'vision_tower' must all be set")
        if dtype not in DTYPES:
            raise ValueError(f"vqascore: dtype must be one of {list(DTYPES)}, got {dtype!r} "
                             f"(float16 overflows in T5)")
        if reduction not in REDUCTIONS:
            raise ValueError(f"vqascore: reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
        if int(batch_size) < 1 or int(image_size) < 1:
            raise ValueError("vqascore: batch_size and image_size must be >= 1")
        self.checkpoint, self.t5_config, self.tokenizer = checkpoint, t5_config, tokenizer
        self.vision_tower = vision_tower
        self.question_template = _check_template(question_template, "question_template")
        self.answer_template = _check_template(answer_template, "answer_template")
        self.reduction, self.image_size, self.batch_size = reduction, int(image_size), int(batch_size)
        self.device, self.dtype, self.cache_dir = device, dtype, cache_dir
        self._t5 = None

    def params(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "t5_config": self.t5_config, "tokenizer": self.tokenizer,
                "vision_tower": self.vision_tower, "question_template": self.question_template,
                "answer_template": self.answer_template, "reduction": self.reduction,
                "image_size": self.image_size, "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint, "t5_config": self.t5_config, "tokenizer": self.tokenizer,
                "vision_tower": self.vision_tower}

    # ---- loading -------------------------------------------------------------------------------------
    def _resolve_dtype(self, device: str):
        import torch

        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
        elif dtype != "float32" and not str(device).startswith("cuda"):
            warnings.warn(f"vqascore: dtype {dtype} is for GPUs; running in float32 on {device}", stacklevel=3)
            dtype = "float32"
        return getattr(torch, dtype)

    def load(self) -> None:
        import torch
        from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, T5Config,
                                  T5ForConditionalGeneration)

        from ..checkpoints import load_state_dict

        kw = {"cache_dir": self.cache_dir or None}
        tokenizer = AutoTokenizer.from_pretrained(local_copy(self.tokenizer, self.cache_dir), **kw)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"vqascore: tokenizer {self.tokenizer} has no pad token (a T5 tokenizer has <pad>)")
        t5_config = T5Config.from_pretrained(local_copy(self.t5_config, self.cache_dir), **kw)
        tower = local_copy(self.vision_tower, self.cache_dir)
        vision_config = CLIPVisionConfig.from_pretrained(tower, **kw)
        if vision_config.image_size != self.image_size:
            raise ValueError(f"vqascore: vision tower {self.vision_tower} takes {vision_config.image_size}px "
                             f"images but image_size is {self.image_size}")

        state = load_state_dict(self.checkpoint, self.cache_dir)
        # vocabulary rows as saved (the original's config matches its checkpoint); resized to the tokenizer below
        rows = next((v.shape[0] for k, v in state.items()
                     if k.removeprefix("module.").removeprefix("model.") in
                     ("shared.weight", "embed_tokens.weight", "encoder.embed_tokens.weight")), None)
        if rows is not None:
            t5_config.vocab_size = int(rows)
        with torch.device("meta"):
            t5 = T5ForConditionalGeneration(t5_config)
        t5_keys = set(t5.state_dict())
        vision_sd, proj_sd, t5_sd, unmatched = map_release_keys(state, t5_keys, bool(t5_config.tie_word_embeddings))
        if unmatched:
            raise ValueError(f"vqascore: {self.checkpoint}: {len(unmatched)} keys match nothing in CLIP-FlanT5 "
                             f"(vision_tower.vision_tower.*, mm_projector.0/2.*, T5 names): "
                             f"{', '.join(unmatched[:8])}{' ...' if len(unmatched) > 8 else ''}")
        del state

        device = pick_device(self.device)
        dtype = self._resolve_dtype(device)
        t5 = t5.to_empty(device="cpu").to(dtype)  # uninitialised, in the run dtype: every tensor is loaded below
        _load_strict(t5, t5_sd, "T5", self.checkpoint)
        t5.tie_weights()
        n_vocab = len(tokenizer)
        if n_vocab > t5_config.vocab_size:
            raise ValueError(f"vqascore: tokenizer {self.tokenizer} has {n_vocab} tokens but the checkpoint's "
                             f"embeddings only {t5_config.vocab_size}")
        if n_vocab < t5_config.vocab_size:  # the original: model.resize_token_embeddings(len(tokenizer))
            t5.resize_token_embeddings(n_vocab)

        if vision_sd:
            vision = CLIPVisionModel(vision_config)
            _load_strict(vision, vision_sd, "vision tower", self.checkpoint)
        else:
            vision = CLIPVisionModel.from_pretrained(tower, **kw)
        projector = _projector_class()(vision_config.hidden_size, t5_config.d_model)
        _load_strict(projector, proj_sd, "projector (mm_projector)", self.checkpoint)

        self._vision = vision.to(device=device, dtype=dtype).eval()
        self._projector = projector.to(device=device, dtype=dtype).eval()
        self._t5 = t5.to(device=device, dtype=dtype).eval()
        self._tokenizer, self._device, self._torch_dtype = tokenizer, device, dtype

    # ---- preprocessing -------------------------------------------------------------------------------
    def preprocess_key(self) -> Optional[Hashable]:
        return ("clip_expand2square", self.image_size, CLIP_MEAN, CLIP_STD)

    def preprocess(self, images: Sequence[Image.Image]):
        return expand2square_clip(images, self.image_size)

    # ---- scoring -------------------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        """Token ids of ``text``, each ``<image>``-separated piece tokenized on its own (special tokens
        included), with ``_IMAGE`` between pieces: t2v_metrics' ``t5_tokenizer_image_token``."""
        ids: list[int] = []
        for i, piece in enumerate(text.split(IMAGE_MARKER)):
            if i:
                ids.append(_IMAGE)
            ids.extend(self._tokenizer(piece).input_ids)
        return ids[:CONTEXT_LEN]

    def token_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """(encoder ids with ``_IMAGE`` at the image position, answer ids) for one prompt."""
        question = chat_prompt(self.question_template.format(prompt))
        return self._ids(question), self._ids(self.answer_template.format(prompt))

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        if self._t5 is None:
            self.load()
        if len(pixels) != len(prompts):
            raise ValueError(f"vqascore: {len(pixels)} images but {len(prompts)} prompts")
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            out.extend(self._score(pixels[start:stop], prompts[start:stop]))
        return out

    def _score(self, pixels, prompts: Sequence[str]) -> list[float]:
        import torch

        dev, dt = self._device, self._torch_dtype
        pairs = [self.token_ids(p) for p in prompts]
        with torch.no_grad():
            hidden = self._vision(pixel_values=pixels.to(dev, dt), output_hidden_states=True).hidden_states
            image_tokens = self._projector(hidden[-2][:, 1:])  # penultimate layer, patch tokens (CLS dropped)
            embed = self._t5.get_input_embeddings()
            rows = []
            for (ids, _), feats in zip(pairs, image_tokens):
                at = ids.index(_IMAGE) if ids.count(_IMAGE) == 1 else None
                if at is None:
                    raise ValueError("vqascore: the encoder input must hold exactly one image position")
                before = embed(torch.tensor(ids[:at], dtype=torch.long, device=dev))
                after = embed(torch.tensor(ids[at + 1:], dtype=torch.long, device=dev))
                rows.append(torch.cat([before, feats.to(before.dtype), after], dim=0))
            length = max(r.shape[0] for r in rows)
            d = rows[0].shape[1]
            inputs = torch.zeros(len(rows), length, d, dtype=rows[0].dtype, device=dev)
            mask = torch.zeros(len(rows), length, dtype=torch.long, device=dev)
            for i, r in enumerate(rows):  # right padding, masked: as the original's padded question ids
                inputs[i, :r.shape[0]] = r
                mask[i, :r.shape[0]] = 1
            answers = [a for _, a in pairs]
            alen = max(len(a) for a in answers)
            labels = torch.full((len(answers), alen), -100, dtype=torch.long, device=dev)
            for i, a in enumerate(answers):
                labels[i, :len(a)] = torch.tensor(a, dtype=torch.long)
            valid = labels.ne(-100)
            start = self._t5.config.decoder_start_token_id
            decoder_ids = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
            decoder_ids = decoder_ids.masked_fill(decoder_ids.eq(-100), self._t5.config.pad_token_id)
            logits = self._t5(inputs_embeds=inputs, attention_mask=mask, decoder_input_ids=decoder_ids,
                              decoder_attention_mask=valid.long()).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
            total = token_logp.sum(-1)
            if self.reduction == "mean":
                total = total / valid.sum(-1)
            return [float(s) for s in total.exp().cpu()]
