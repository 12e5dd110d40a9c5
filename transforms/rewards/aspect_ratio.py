"""Aspect ratio: closeness of width / height to a target, on a log scale. Ignores the prompt.

score = -|log(width / height) - log(target)|: 0 for the target ratio, below 0 otherwise; higher =
closer to ``target`` (default 1.0, square). The log makes 2:1 and 1:2 equally far from square, and
a ratio r times too wide as far as one r times too narrow.
"""
from __future__ import annotations

import math
from typing import Sequence

from PIL import Image

from .base import Reward, register_reward


@register_reward("aspect_ratio")
class AspectRatio(Reward):
    """Minus |log(w/h) - log(target)|: higher = closer to ``target`` (w/h, default 1.0). Ignores the prompt."""

    version = "1"

    def __init__(self, target: float = 1.0):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target) \
                or target <= 0:
            raise ValueError(f"aspect_ratio: target must be a finite number > 0 (width / height), got {target!r}")
        self.target = float(target)

    def params(self):
        return {"target": self.target}

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        log_target = math.log(self.target)
        return [0.0 - abs(math.log(im.width / im.height) - log_target) for im in images]  # 0.0 -: no -0.0
