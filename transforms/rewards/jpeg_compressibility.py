"""JPEG size objectives from DDPO (Black et al. 2023): the image's JPEG size in kB at quality 95.

``jpeg_compressibility`` is minus the size (smaller file = higher), ``jpeg_incompressibility`` is plus
the size (larger file = higher). Both are **generation objectives** for reward-fine-tuning experiments,
not quality rewards: blur, flat colour and empty backgrounds compress well, noise and fine texture do
not, so compressibility prefers a blurred or blank image to a sharp one and incompressibility prefers a
noisy one to a clean one (``tests/test_weight_free_rewards.py`` shows both on real photographs). For
technical image quality use ``brisque``. Neither uses the prompt.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

from PIL import Image

from .base import Reward, register_reward


def jpeg_kilobytes(image: Image.Image, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of the image saved as an RGB JPEG by Pillow at ``quality``."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class _JpegSize(Reward):
    """The shared mechanism: ``sign`` * JPEG kB at ``quality`` (1..100, default 95 as in DDPO)."""

    sign: float

    def __init__(self, quality: int = 95):
        if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not math.isfinite(quality) \
                or quality != int(quality) or not 1 <= quality <= 100:
            raise ValueError(f"{self.name}: quality must be an integer in 1..100, got {quality!r}")
        self.quality = int(quality)

    def params(self):
        return {"quality": self.quality}

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [self.sign * jpeg_kilobytes(im, self.quality) for im in images]


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """Minus JPEG kB: higher = smaller file (simpler, smoother or blurrier image). A generation
    objective (DDPO's compressibility), not a quality reward. Ignores the prompt."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """Plus JPEG kB: higher = larger file (more texture, detail or noise). A generation objective
    (DDPO's incompressibility), not a quality reward. Ignores the prompt."""

    sign = 1.0
