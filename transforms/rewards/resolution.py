"""Resolution: the image's pixel count. Higher = more pixels. Ignores the prompt.

Only useful when candidates come at different sizes (several generators, or upscalers); for
candidates of one size it ties everything. ``unit``: ``megapixels`` (default, width * height / 1e6)
or ``pixels`` (width * height).
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image

from .base import Reward, register_reward

UNITS = {"megapixels": 1e6, "pixels": 1.0}


@register_reward("resolution")
class Resolution(Reward):
    """Width * height in ``unit`` (``megapixels`` or ``pixels``): higher = larger. Ignores the prompt."""

    version = "1"

    def __init__(self, unit: str = "megapixels"):
        if unit not in UNITS:
            raise ValueError(f"resolution: unit must be one of {list(UNITS)}, got {unit!r}")
        self.unit = unit

    def params(self):
        return {"unit": self.unit}

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [im.width * im.height / UNITS[self.unit] for im in images]
