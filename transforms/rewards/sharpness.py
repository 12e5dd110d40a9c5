"""Image sharpness: variance of the Laplacian of the grey image (a standard focus measure)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .base import Reward, register_reward


def laplacian_variance(image: Image.Image) -> float:
    g = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    if g.shape[0] < 3 or g.shape[1] < 3:
        return float("nan")
    lap = g[1:-1, :-2] + g[1:-1, 2:] + g[:-2, 1:-1] + g[2:, 1:-1] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


@register_reward("sharpness")
class Sharpness(Reward):
    """Higher = more high-frequency detail. Ignores the prompt."""

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [laplacian_variance(im) for im in images]
