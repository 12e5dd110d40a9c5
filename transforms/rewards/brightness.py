"""Mean brightness: a first-order generation objective for checking that labels reach a model.

``brightness`` is the mean Rec. 601 luma of the image (Y = 0.299 R + 0.587 G + 0.114 B, on sRGB values
scaled to 0..1, no linearisation), ``darkness`` its exact negative. Like DDPO's JPEG objectives these are
not quality rewards. They exist because the mean of an image is what a denoiser can shift most directly
(a bias on its prediction), so a preference for it reaches even a tiny random model; the loop test
(``tests/test_loop.py``) trains on one and on the other and checks that the two tuned models move apart
in the labels' direction. Neither uses the prompt.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from .base import Reward, register_reward

LUMA = np.array([0.299, 0.587, 0.114])


def mean_luma(image: Image.Image) -> float:
    """Mean Rec. 601 luma of ``image`` in 0..1."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return float((rgb @ LUMA).mean())


class _Luma(Reward):
    """The shared mechanism: ``sign`` * mean luma."""

    sign: float

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return [self.sign * mean_luma(im) for im in images]


@register_reward("brightness")
class Brightness(_Luma):
    """Mean luma in 0..1: higher = brighter. A generation objective, not a quality reward."""

    sign = 1.0


@register_reward("darkness")
class Darkness(_Luma):
    """Minus mean luma: higher = darker. The exact negative of ``brightness``."""

    sign = -1.0
