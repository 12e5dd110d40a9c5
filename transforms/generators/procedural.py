"""A model-free generator for testing and benchmarking the data plane at real image sizes.

``type: procedural`` makes no use of the prompt's meaning and loads no model. It
exists so that staging, scoring, ranking, writing and memory use can be tested
and benchmarked at real image sizes (512 px and up) without a diffusion model,
which on CPU would take seconds per image and hide everything else. Its images
are not samples of anything; never train on them.

An image is a deterministic function of (prompt, seed, height, width): a smooth
random field, the sum of three octaves of low-resolution noise upsampled with
PIL's bicubic filter, plus a faint grain. The random state comes from
``numpy.random.default_rng(seed ^ sha256(prompt))``, so the same seed and prompt
give the same bytes on every machine, and different seeds differ. The octave
weights are drawn per image, so images range from soft to detailed and a
sharpness-type reward spreads them out; the field is smooth, so PNG compresses
it roughly like a generated photo-like image rather than like white noise.

Config: ``model`` is any label recorded in the lineage; use a hub-style id such
as ``synpref/procedural`` so the build's preflight (which checks local model
paths) passes it through. ``height`` and ``width`` apply; steps, guidance,
scheduler and dtype are ignored (the lineage records steps 0, guidance 0.0,
scheduler ``none`` and dtype ``float32``). About 6 ms per 512x512 image on one CPU core.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
from PIL import Image

from ...schemas.records import Lineage

from .base import Generator, register_generator

# Low-resolution grid sizes of the three octaves (cells along the longer side) and their base weights.
_OCTAVES = ((4, 1.0), (16, 0.5), (64, 0.35))
# The octaves are summed at this many pixels along the longer side at most, then upsampled once.
_WORKING_SIDE = 128


def prompt_hash(prompt: str) -> int:
    """64 bits of sha256(prompt): stable across processes (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")


def _scaled(cells: int, height: int, width: int) -> tuple[int, int]:
    side = max(height, width)
    return max(2, min(height, round(cells * height / side))), max(2, min(width, round(cells * width / side)))


def _upsample(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 HxWx3 -> float32 height x width x 3 (0..255), PIL bicubic."""
    if pixels.shape[:2] == (height, width):
        return pixels.astype(np.float32)
    return np.asarray(Image.fromarray(pixels, mode="RGB").resize((width, height), Image.BICUBIC), dtype=np.float32)


def procedural_image(prompt: str, seed: int, height: int, width: int) -> np.ndarray:
    """One HxWx3 float32 image in [0, 1], a pure function of its arguments."""
    rng = np.random.default_rng(int(seed) ^ prompt_hash(prompt))
    # Per-image detail level: how much of the finer octaves and of the grain this image gets.
    detail = rng.uniform(0.05, 1.0, size=2)
    weights = (_OCTAVES[0][1], _OCTAVES[1][1] * detail[0], _OCTAVES[2][1] * detail[0] * detail[1])
    wh, ww = _scaled(_WORKING_SIDE, height, width)
    field = np.zeros((wh, ww, 3), dtype=np.float32)
    for (cells, _), weight in zip(_OCTAVES, weights):
        low = rng.integers(0, 256, size=(*_scaled(cells, wh, ww), 3), dtype=np.uint8)
        field += np.float32(weight) * _upsample(low, wh, ww)
    # Per-image contrast and brightness, at the working size; then one upsample to the full size.
    lo, hi = rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0)
    field *= np.float32((hi - lo) / sum(weights))
    field += np.float32(255.0 * lo)
    image = _upsample(np.clip(field, 0.0, 255.0).round().astype(np.uint8), height, width)
    # Faint luminance grain (up to +-3 grey levels), so flat areas are not perfectly flat, as in real renders.
    grain = rng.integers(-3, 4, size=(height, width, 1), dtype=np.int8).astype(np.float32)
    image += np.float32(detail[1]) * grain
    image *= np.float32(1.0 / 255.0)
    np.clip(image, 0.0, 1.0, out=image)
    return image


@register_generator("procedural")
class ProceduralGenerator(Generator):
    """Deterministic smooth random fields, no model: for data-plane tests and benchmarks only."""

    def load(self) -> None:
        """Nothing to load."""

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds")
        c = self.config
        return [procedural_image(p, s, c.height, c.width) for p, s in zip(prompts, seeds)]

    def files(self) -> dict[str, str]:
        return {}  # no model: ``model`` is only a name

    def lineage(self, seed: int) -> Lineage:
        c = self.config
        return Lineage(
            generator_id=c.id, model=c.model, revision=c.revision or "main",
            pipeline_class="procedural", scheduler="none", num_inference_steps=0, guidance_scale=0.0,
            height=c.height, width=c.width, dtype="float32", seed=int(seed),
            generated_height=c.height, generated_width=c.width)
