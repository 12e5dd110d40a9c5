"""The 64-bit difference hash (dHash) every near-duplicate check in synpref uses (build and corpus filter).

The image is converted to grey (Pillow's ``L``), resized to 9 x 8 with Lanczos resampling, and each
of the 8 x 8 bits says whether a pixel is brighter than its left neighbour, row by row, first bit
most significant. Resizing averages away noise, JPEG artefacts and small shifts, so near-identical
images differ in few bits, while unrelated images differ in about half of the 64 (docs/math.md).
Hashes are stored as 16 lowercase hex digits; ``hamming`` takes ints or such strings.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

HASH_BITS = 64


def dhash(image: Image.Image) -> int:
    """The 64-bit difference hash of ``image`` as an int (see the module docstring)."""
    px = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (px[:, 1:] > px[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def dhash_hex(image: Image.Image) -> str:
    """The difference hash as 16 lowercase hex digits."""
    return f"{dhash(image):016x}"


def hamming(a: int | str, b: int | str) -> int:
    """Number of differing bits of two hashes (ints or hex strings)."""
    a = int(a, 16) if isinstance(a, str) else a
    b = int(b, 16) if isinstance(b, str) else b
    return bin(a ^ b).count("1")
