"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): Qwen2-VL-7B with a reward token.

How it is built, its checkpoint format and how it was checked: docs/rewards.md, `hpsv3`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from PIL import Image

from .base import Reward, register_reward
from ..model_io import local_copy, pick_device

DEFAULT_BASE_MODEL = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
DEFAULT_PIXELS = 256 * 28 * 28  # the authors' min_pixels = max_pixels
IMAGE_FACTOR = 28  # patch 14 x spatial merge 2
MAX_RATIO = 200
DTYPES = ("bfloat16", "float32", "float16")

INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements "
    "(e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align "
    "with the textual description. The subject should match the description in terms of number, appearance, and "
    "behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, "
    "but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n")
PROMPT_WITH_REWARD_TOKEN = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


def hpsv3_text(prompt: str) -> str:
    """The user turn's text for one prompt, as the authors build it."""
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_REWARD_TOKEN


def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR):
    """(height, width) for the vision tower: multiples of ``factor`` with area near the pixel budget (Qwen's rule)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is above {MAX_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resize_for_hpsv3(image: Image.Image, pixels: int = DEFAULT_PIXELS) -> Image.Image:
    """RGB, then bicubic to the smart-resize size at ``min_pixels = max_pixels = pixels``."""
    image = image.convert("RGB")
    h, w = smart_resize(image.height, image.width, pixels, pixels)
    return image.resize((w, h), Image.BICUBIC)


# The release's names (transformers < 4.52) and the newer layout, onto transformers' Qwen2VLModel + the head.
KEY_MAP = (("model.visual.", "visual."), ("model.language_model.", "language_model."), ("visual.", "visual."),
           ("model.", "language_model."), ("rm_head.", "rm_head."))
SKIPPED_KEYS = ("lm_head.weight",)  # next-token logits: not part of the score


def map_release_keys(state: dict) -> tuple[dict, dict, list]:
    """Split a released state dict into (backbone state for Qwen2VLModel, head state without the ``rm_head.``
    prefix, unmatched keys)."""
    backbone, head, unmatched = {}, {}, []
    for key, value in state.items():
        if key in SKIPPED_KEYS:
            continue
        for old, new in KEY_MAP:
            if key.startswith(old):
                if new == "rm_head.":
                    head[key[len(old):]] = value  # "0.weight" ... for the head's own Sequential
                else:
                    backbone[new + key[len(old):]] = value
                break
        else:
            unmatched.append(key)
    return backbone, head, unmatched


def build_head(hidden_size: int):
    """The authors' "ranknet" head with rm_head_kwargs None (dropout is inactive at inference)."""
    from torch import nn

    return nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


@register_reward("hpsv3")
class HPSv3(Reward):
    """Args:
    checkpoint: ``HPSv3.safetensors`` (required; hub repo ``MizzenAI/HPSv3``), local path or fsspec URL
        (``hf://MizzenAI/HPSv3/HPSv3.safetensors``); a weights-only pickle of the same state dict also loads.
    base_model: folder or hub id whose ``config.json`` is the Qwen2-VL architecture (default
        ``Qwen/Qwen2-VL-7B-Instruct``; only the config is read, the checkpoint holds every weight).
    processor: the Qwen2-VL processor (tokenizer, image processor, chat template); default: ``base_model``.
    pixels: the image pixel budget, min = max as the authors (default 256*28*28 = 200704, 448x448 when square).
    dtype: ``bfloat16`` (default, the authors'), ``float32``, ``float16``; the head is always float32.
    device: ``auto`` (next GPU, else CPU) or a torch device; batch_size: images per forward pass.
    """

    version = "1"

    def __init__(self, checkpoint: str = "", base_model: str = DEFAULT_BASE_MODEL, processor: str = "",
                 pixels: int = DEFAULT_PIXELS, dtype: str = "bfloat16", device: str = "auto", batch_size: int = 4,
                 cache_dir: str = ""):
        if not checkpoint:
            raise ValueError("hpsv3: 'checkpoint' is required: HPSv3.safetensors from the hub repo MizzenAI/HPSv3")
        if not base_model:
            raise ValueError("hpsv3: 'base_model' is required (the Qwen2-VL-7B-Instruct config folder or hub id)")
        if dtype not in DTYPES:
            raise ValueError(f"hpsv3: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if int(pixels) < IMAGE_FACTOR * IMAGE_FACTOR:
            raise ValueError(f"hpsv3: pixels must be at least {IMAGE_FACTOR * IMAGE_FACTOR}, got {pixels}")
        if int(batch_size) < 1:
            raise ValueError("hpsv3: batch_size must be >= 1")
        self.checkpoint, self.base_model, self.processor_path = checkpoint, base_model, processor or base_model
        self.pixels, self.dtype, self.device = int(pixels), dtype, device
        self.batch_size, self.cache_dir = int(batch_size), cache_dir
        self._model = self._head = self._processor = None

    def params(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "base_model": self.base_model, "processor": self.processor_path,
                "pixels": self.pixels, "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        return {"checkpoint": self.checkpoint, "base_model": self.base_model, "processor": self.processor_path}

    def load(self) -> None:
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModel, AutoProcessor

        from ..checkpoints import load_state_dict

        processor = AutoProcessor.from_pretrained(local_copy(self.processor_path, self.cache_dir),
                                                  trust_remote_code=False)
        tokenizer = processor.tokenizer
        if REWARD_TOKEN not in tokenizer.get_vocab():  # as the authors: one added special token
            tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._reward_id = int(tokenizer.convert_tokens_to_ids(REWARD_TOKEN))

        state = load_state_dict(self.checkpoint, self.cache_dir)
        backbone, head, unmatched = map_release_keys(state)
        config = AutoConfig.from_pretrained(local_copy(self.base_model, self.cache_dir), trust_remote_code=False)
        if config.model_type != "qwen2_vl":
            raise ValueError(f"hpsv3: base_model {self.base_model} is a {config.model_type!r} config, not qwen2_vl")
        embed = backbone.get("language_model.embed_tokens.weight")
        if embed is not None:  # the authors resized the embeddings to len(tokenizer) after adding <|Reward|>
            config.text_config.vocab_size = int(embed.shape[0])
            if embed.shape[0] != len(tokenizer):
                raise ValueError(f"hpsv3: the checkpoint's embeddings have {embed.shape[0]} rows but the processor's "
                                 f"tokenizer has {len(tokenizer)} tokens with {REWARD_TOKEN}: wrong processor for "
                                 f"{self.checkpoint}")
        dtype = getattr(torch, self.dtype)
        with init_empty_weights(include_buffers=False):  # parameters on meta: the checkpoint replaces them all
            model = AutoModel.from_config(config, dtype=dtype, attn_implementation="sdpa")
        head_module = build_head(config.text_config.hidden_size)
        head_names = {"rm_head." + k for k in head_module.state_dict()}
        head_given = {"rm_head." + k for k in head}
        missing = sorted(set(model.state_dict()) - set(backbone)) + sorted(head_names - head_given)
        unexpected = sorted(set(backbone) - set(model.state_dict())) + sorted(head_given - head_names)
        if unmatched or missing or unexpected:
            raise ValueError(f"hpsv3: checkpoint {self.checkpoint} does not match Qwen2-VL + HPSv3 head: "
                             f"unmatched keys {sorted(unmatched)[:10]}, missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]} (first 10 of each)")
        model.load_state_dict(backbone, strict=True, assign=True)
        head_module.load_state_dict(head, strict=True)
        self._device = pick_device(self.device)
        # The authors cast the whole backbone (rotary buffers too) to the training dtype, the head to float32.
        self._model = model.to(device=self._device, dtype=dtype).eval()
        self._head = head_module.to(device=self._device, dtype=torch.float32).eval()
        self._processor = processor

    def _loaded(self):
        if self._model is None:
            self.load()
        return self._model

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        """One left-padded batch: chat-rendered texts and smart-resized images."""
        processor = self._processor
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": hpsv3_text(p)}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
        pixels = [resize_for_hpsv3(im, self.pixels) for im in images]
        return processor(text=texts, images=pixels, padding=True, return_tensors="pt", do_resize=False)

    def mu_sigma(self, images: Sequence[Image.Image], prompts: Sequence[str]):
        """(mu, sigma) per image, float32 tensor [n, 2], one forward pass (no batching, no NaN handling)."""
        import torch

        model = self._loaded()
        batch = self.inputs(images, prompts).to(self._device)
        mask = batch["attention_mask"]
        # Text positions on all three rotary axes, counted over real tokens (as the authors' right-padded arange).
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        positions = positions.unsqueeze(0).expand(3, -1, -1)
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions,
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                           use_cache=False).last_hidden_state
            is_reward = batch["input_ids"] == self._reward_id
            if not bool(is_reward.any(-1).all()):
                raise ValueError(f"hpsv3: a rendered prompt lost its {REWARD_TOKEN} token")
            last = (is_reward.long() * torch.arange(is_reward.shape[1], device=is_reward.device)).argmax(-1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return self._head(pooled.float())

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"hpsv3: {len(images)} images but {len(prompts)} prompts")
        self._loaded()
        out: list[float] = [float("nan")] * len(images)
        usable = []
        for i, im in enumerate(images):
            try:
                smart_resize(im.height, im.width, self.pixels, self.pixels)
                usable.append(i)
            except ValueError:
                pass  # extreme aspect ratio: NaN, as smart_resize refuses it
        for start in range(0, len(usable), self.batch_size):
            chunk = usable[start:start + self.batch_size]
            mu = self.mu_sigma([images[i] for i in chunk], [prompts[i] for i in chunk])[:, 0]
            for i, value in zip(chunk, mu.cpu().tolist()):
                out[i] = float(value)
        return out
