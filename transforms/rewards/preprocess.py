"""Image preprocessing shared by rewards: one function per recipe, so rewards that share one share the tensor.

Each returns a float32 CPU tensor [N, 3, size, size]; rewards move it to their device and dtype.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalise(arrays: list[np.ndarray], mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def clip_center_crop(images: Sequence[Image.Image], size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's recipe: shortest side to ``size`` (bicubic), centre crop, CLIP mean/std.

    Sizes and offsets are rounded as torchvision's Resize / CenterCrop round them, so the tensor
    equals open_clip's own transform to the bit.
    """
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        out.append(np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8))
    return _normalise(out, mean, std)


def clip_pad_square(images: Sequence[Image.Image], size: int = 224, fill=(0, 0, 0), mean=CLIP_MEAN,
                    std=CLIP_STD) -> torch.Tensor:
    """HPS's recipe: longest side to ``size`` (bicubic), pad to a square with ``fill``, CLIP mean/std."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), fill)
        canvas.paste(im.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
        out.append(np.asarray(canvas, dtype=np.uint8))
    return _normalise(out, mean, std)
