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
    """HPS's recipe (its ``ResizeMaxSize``): longest side to ``size``, pad to a square with ``fill``, CLIP mean/std.

    HPS converts to a float tensor in [0, 1] *before* resizing, so the resize is torchvision's tensor
    bicubic (antialiased, torchvision's default since 0.17) on floats: no rounding back to 8 bits and no
    clamping of the bicubic overshoot. A PIL resize of the 8-bit image differs by up to 0.2 per pixel
    (after normalisation), enough to move scores by 5e-3 relative. Sizes round as HPS rounds them
    (``round(side * size / longest)``), padding splits ``//2`` left/top. An image whose longest side is
    already ``size`` is not resized (HPS leaves it alone too; HPS then leaves a non-square one unpadded,
    which its ViT cannot take: it is padded here).
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    out = []
    for im in images:
        x = TF.to_tensor(im.convert("RGB"))
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        if scale != 1.0:
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
            x = TF.resize(x, [h, w], InterpolationMode.BICUBIC, antialias=True)
        canvas = torch.tensor(fill, dtype=torch.float32).div(255.0).view(3, 1, 1).repeat(1, size, size)
        top, left = (size - h) // 2, (size - w) // 2
        canvas[:, top:top + h, left:left + w] = x
        out.append(canvas)
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
