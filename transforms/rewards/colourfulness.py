"""Colourfulness, the metric of Hasler & Suesstrunk, "Measuring colourfulness in natural images" (2003).

On the RGB values in 0..255 (sRGB as stored, no linearisation, as in the paper):
rg = R - G, yb = (R + G) / 2 - B, and

    M = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

with population (not sample) standard deviations over all pixels. Higher = more colourful (the paper
maps M of about 0 / 15 / 33 / 45 / 59 / 82 / 109 to "not / slightly / moderately / averagely / quite /
highly / extremely colourful"). A greyscale image scores 0. It ignores the prompt, and more colour is
not better in general: use it as a style signal, not a quality reward.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .base import Reward, register_reward


def colourfulness(image: Image.Image) -> float:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


@register_reward("colourfulness")
class Colourfulness(Reward):
    """Hasler-Suesstrunk M: higher = more colourful. No parameters. Ignores the prompt."""

    version = "1"

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [colourfulness(im) for im in images]
