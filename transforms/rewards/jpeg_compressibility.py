"""JPEG compressibility, the DDPO reward (Black et al. 2023): minus the JPEG size in kB at quality 95."""
from __future__ import annotations

import io
from typing import Sequence

from PIL import Image

from .base import Reward, register_reward


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Smaller JPEG = simpler image = higher reward. Ignores the prompt."""

    def __init__(self, quality: int = 95):
        self.quality = int(quality)

    def params(self):
        return {"quality": self.quality}

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        out = []
        for im in images:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=self.quality)
            out.append(-buf.tell() / 1000.0)
        return out
