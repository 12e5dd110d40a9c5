"""PickScore v1 (Kirstain et al. 2023): a CLIP ViT-H/14 (transformers ``CLIPModel``) fine-tuned on Pick-a-Pic.

Two downloads: the weights (``yuvalkirstain/PickScore_v1``, safetensors) and, hidden in the authors' code,
the processor (tokenizer + image processor) from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Both are params
and both are in ``files()``, so an offline run names each one it lacks before it starts.

Score: ``logit_scale.exp() * cos(image, prompt)`` for each image with its own prompt, as the authors'
reference code computes it (about 20-23 for real images); a softmax over one prompt's candidates would give
preference probabilities with the same order. Not shared with the other CLIP rewards' preprocessing: the
HF image processor is not bit-identical to ``preprocess.clip_center_crop`` (see ``image_backend``).
"""
from __future__ import annotations

from typing import Hashable, Sequence

from .base import Reward, register_reward
from .clip_score import check_dtype, resolve_dtype
from ..model_io import local_copy, pick_device

BACKENDS = ("pil", "torchvision")


def _projected(out):
    """transformers 4.x returns the projected features as a tensor, 5.x in ``pooler_output``."""
    return out if hasattr(out, "ndim") else out.pooler_output


class HFClipProcessor:
    """The Hugging Face CLIP image processor + tokenizer at ``self.processor``, as a shared preprocessing
    step: rewards that use it (pickscore, mps, nsfw) report one key, so an ensemble runs it once."""

    uses_tokenizer = True  # False for image-only rewards (nsfw): their processor folder has no tokenizer

    def _load_processor(self) -> None:
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        where = local_copy(self.processor, self.cache_dir)
        kw = {"cache_dir": self.cache_dir or None}
        if int(transformers.__version__.split(".")[0]) >= 5:
            backend = {"backend": self.image_backend}
        else:  # transformers 4: the slow processor is PIL's, the fast one torchvision's
            backend = {"use_fast": self.image_backend == "torchvision"}
        self._image_processor = AutoImageProcessor.from_pretrained(where, **backend, **kw)
        if self.uses_tokenizer:
            self._tokenizer = AutoTokenizer.from_pretrained(where, **kw)

    def preprocess_key(self) -> Hashable:
        """Not ``clip_center_crop``'s key: the processor's crop offsets round differently (see PickScore)."""
        return ("hf_clip_image_processor", self.processor, self.image_backend)

    def decode_min_side(self) -> int:
        """The processor's resize target, read from its loaded config: ``shortest_edge`` (CLIP's recipe: short
        side to that size, then a centre crop), or the larger of ``height`` / ``width`` for a squash to a fixed
        size; 0 when it does not resize (it would crop or read the full-size image)."""
        if self._image_processor is None:
            self._load_processor()
        size = getattr(self._image_processor, "size", None)
        if not getattr(self._image_processor, "do_resize", False) or size is None:
            return 0
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        if get("shortest_edge"):
            return int(get("shortest_edge"))
        if get("height") and get("width"):
            return int(max(get("height"), get("width")))
        return 0

    def preprocess(self, images):
        if self._image_processor is None:
            self._load_processor()
        return self._image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]


class HFModelWithProcessor(HFClipProcessor):
    """A model folder (``self.model``) plus its HF processor: the settings, checks, ``params`` and ``files``
    that pickscore and nsfw share (each reward checks its own required locations first)."""

    def _configure(self, model: str, processor: str, image_backend: str, device: str, dtype: str,
                   cache_dir: str) -> None:
        if image_backend not in BACKENDS:
            raise ValueError(f"{self.name}: image_backend must be one of {list(BACKENDS)}, got {image_backend!r}")
        check_dtype(self.name, dtype)
        self.model, self.processor, self.image_backend = model, processor, image_backend
        self.device, self.dtype, self.cache_dir = device, dtype, cache_dir
        self._image_processor = None

    def params(self):
        return {"model": self.model, "processor": self.processor, "image_backend": self.image_backend,
                "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        return {"model": self.model, "processor": self.processor}


@register_reward("pickscore")
class PickScore(HFModelWithProcessor, Reward):
    """Args:
    model: ``CLIPModel`` folder or hub id (default ``yuvalkirstain/PickScore_v1``); gs:// / s3:// copied first.
    processor: processor folder or hub id (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
    image_backend: ``pil`` (default) is the PIL image processor, the one PickScore was trained and
        published with (transformers 4's ``CLIPImageProcessor``); ``torchvision`` is transformers 5's
        default, faster, and off by up to one grey level per pixel from PIL's bicubic. Measured against
        ``clip_center_crop``: the PIL processor is bit-identical except where the resized long side minus
        224 is 3 mod 4 (HF floors the crop offset, torchvision rounds it: one pixel shift).
    dtype: ``float32`` (default); ``float16`` / ``bfloat16`` on CUDA only.
    """

    version = "1"

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1",
                 processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", image_backend: str = "pil",
                 device: str = "auto", dtype: str = "float32", cache_dir: str = ""):
        if not model or not processor:
            raise ValueError("pickscore: 'model' and 'processor' must both be set")
        self._configure(model, processor, image_backend, device, dtype, cache_dir)
        self._model = None

    def load(self) -> None:
        from transformers import CLIPModel

        device = pick_device(self.device)
        torch_dtype = resolve_dtype("pickscore", self.dtype, device)
        if self._image_processor is None:
            self._load_processor()
        model = CLIPModel.from_pretrained(local_copy(self.model, self.cache_dir), cache_dir=self.cache_dir or None)
        self._device, self._dtype = device, torch_dtype
        self._scale = float(model.logit_scale.detach().float().exp())  # before any cast to half precision
        self._model = model.to(device=device, dtype=torch_dtype).eval()

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        import torch

        if self._model is None:
            self.load()
        text = self._tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.no_grad():
            img = _projected(self._model.get_image_features(pixel_values=pixels.to(self._device, self._dtype)))
            txt = _projected(self._model.get_text_features(input_ids=text["input_ids"].to(self._device),
                                                           attention_mask=text["attention_mask"].to(self._device)))
            img = torch.nn.functional.normalize(img.float(), dim=-1)
            txt = torch.nn.functional.normalize(txt.float(), dim=-1)
            scores = self._scale * (img * txt).sum(-1)
        return [float(s) for s in scores.cpu()]
