"""Near-blank detection: how much the grey levels of an image vary (a guard against degenerate images).

Higher = less blank. A constant image (all black, as some safety filters return, all white, one flat
colour) scores 0 with either measure; a photograph scores well above it. It ignores the prompt and
says nothing about quality beyond "there is something in the picture".

``measure="std"`` (default): standard deviation of the grey levels, 0..127.5 (grey = Pillow's ``L``
conversion, ITU-R 601 luma in 0..255). ``measure="entropy"``: Shannon entropy in bits of the 256-bin
grey-level histogram, 0..8. Both look at luma only, so two colours of equal luma read as blank.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .base import Reward, register_reward

MEASURES = ("std", "entropy")


def grey_std(image: Image.Image) -> float:
    """Standard deviation (population) of the grey levels, 0..255 scale."""
    return float(np.asarray(image.convert("RGB").convert("L"), dtype=np.float64).std())


def grey_entropy(image: Image.Image) -> float:
    """Shannon entropy in bits of the 256-bin histogram of the grey levels."""
    hist = np.asarray(image.convert("RGB").convert("L").histogram(), dtype=np.float64)
    p = hist[hist > 0] / hist.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: a constant image gives 0.0, not -0.0


@register_reward("near_blank")
class NearBlank(Reward):
    """Grey-level spread: higher = less blank (``measure``: ``std`` or ``entropy``). Ignores the prompt."""

    version = "1"

    def __init__(self, measure: str = "std"):
        if measure not in MEASURES:
            raise ValueError(f"near_blank: measure must be one of {list(MEASURES)}, got {measure!r}")
        self.measure = measure

    def params(self):
        return {"measure": self.measure}

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        fn = grey_std if self.measure == "std" else grey_entropy
        return [fn(im) for im in images]
