"""NSFW: the Stable Diffusion safety checker (diffusers' ``StableDiffusionSafetyChecker``) as a continuous score.

The checker embeds the image (CLIP ViT-L/14 vision tower + projection), takes the cosine to 17 concept
embeddings and 3 "special care" ones, and subtracts each one's threshold; those margins are rounded to 3
decimals. If any special-care margin is positive, 0.01 is added to every concept margin; the image is
flagged when any concept margin is positive. The score here is the largest concept margin (after that
adjustment) measured from the rounding boundary: ``max_c margin_c - 0.0005``, computed from the float32
product the checker's ``round(margin, 3)`` rounds, so ``score > 0`` is exactly the checker's flag
(numpy >= 2 arithmetic, as the checker's own). Higher = more likely NSFW: filter with
``thresholds: [{reward: nsfw, max: 0}]``. Not a preference: among a build's rewards it would rank NSFW
images higher (reward weights are >= 0, and the build has no per-reward threshold yet).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import Reward, register_reward
from .clip_score import resolve_dtype
from .pickscore import HFModelWithProcessor
from ..model_io import local_copy, pick_device

SPECIAL_CARE_ADJUSTMENT = np.float32(0.01)  # what the checker adds to every concept margin after a special-care hit


def past_rounding_boundary(margins: np.ndarray) -> np.ndarray:
    """``margin - 0.0005`` in float64, signed exactly as the checker's ``round(margin, 3) > 0``.

    numpy rounds a float32 to 3 decimals as ``rint(margin * 1000) / 1000`` in float32, which is positive
    exactly when the float32 product exceeds 0.5; subtracting 0.5 from it in float64 is exact.
    """
    product = margins.astype(np.float32) * np.float32(1000)
    return (product.astype(np.float64) - 0.5) / 1000.0


def nsfw_scores(concept_cos: np.ndarray, concept_thresholds: np.ndarray, special_cos: np.ndarray,
                special_thresholds: np.ndarray) -> np.ndarray:
    """Scores [N] from the checker's float32 cosines [N, 17] / [N, 3] and thresholds, as its ``forward``
    combines them (margins ``cos - threshold``, the special-care adjustment, rounding to 3 decimals)."""
    special = past_rounding_boundary(special_cos - special_thresholds).max(axis=1) > 0
    margins = concept_cos - concept_thresholds
    margins[special] += SPECIAL_CARE_ADJUSTMENT
    return past_rounding_boundary(margins.max(axis=1))


@register_reward("nsfw")
class NSFW(HFModelWithProcessor, Reward):
    """Args:
    model: a ``StableDiffusionSafetyChecker`` folder or hub id (default ``CompVis/stable-diffusion-safety-checker``);
        gs:// / s3:// folders are copied first.
    processor: its ``CLIPImageProcessor`` (``preprocessor_config.json``) folder or hub id (default: ``model``).
    image_backend: ``pil`` (default, transformers 4's ``CLIPImageProcessor``, the one diffusers' pipelines ran
        the checker with) or ``torchvision`` (transformers 5's default).
    dtype: ``float32`` (default); ``float16`` / ``bfloat16`` on CUDA only (the cosines are taken in float32).
    """

    version = "1"
    uses_tokenizer = False

    def __init__(self, model: str = "CompVis/stable-diffusion-safety-checker", processor: str = "",
                 image_backend: str = "pil", device: str = "auto", dtype: str = "float32", cache_dir: str = ""):
        if not model:
            raise ValueError("nsfw: 'model' must be set")
        self._configure(model, processor or model, image_backend, device, dtype, cache_dir)
        self._checker = None

    def load(self) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        device = pick_device(self.device)
        torch_dtype = resolve_dtype("nsfw", self.dtype, device)
        if self._image_processor is None:
            self._load_processor()
        checker = StableDiffusionSafetyChecker.from_pretrained(local_copy(self.model, self.cache_dir),
                                                               cache_dir=self.cache_dir or None)
        self._device, self._dtype = device, torch_dtype
        self._checker = checker.to(device=device, dtype=torch_dtype).eval()
        # thresholds as the checker reads them (``.item()`` of its parameters, in the dtype it runs in)
        self._concept_thresholds = self._checker.concept_embeds_weights.detach().float().cpu().numpy()
        self._special_thresholds = self._checker.special_care_embeds_weights.detach().float().cpu().numpy()

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        """One batched forward; the prompt is ignored."""
        import torch
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        if self._checker is None:
            self.load()
        c = self._checker
        with torch.no_grad():  # the checker's own steps: pooled output -> projection -> cosines, cast to float32
            embeds = c.visual_projection(c.vision_model(pixels.to(self._device, self._dtype))[1])
            special_cos = cosine_distance(embeds, c.special_care_embeds).cpu().float().numpy()
            concept_cos = cosine_distance(embeds, c.concept_embeds).cpu().float().numpy()
        scores = nsfw_scores(concept_cos, self._concept_thresholds, special_cos, self._special_thresholds)
        return [float(s) for s in scores]
