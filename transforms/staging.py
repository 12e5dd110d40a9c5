"""Image staging: each candidate image is written once, as PNG, and referenced by URI afterwards.

This keeps pixels out of shuffles. A staged image has a lineage sidecar so that a
rerun can reuse it instead of generating it again.
"""
from __future__ import annotations

import io
import json

import fsspec
import numpy as np
from PIL import Image

from synpref.schemas.records import Lineage
from synpref.transforms.fileio import read_bytes, write_atomic


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes (no metadata, no timestamps)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def staged_uri(staging_dir: str, candidate_id: str) -> str:
    return f"{staging_dir.rstrip('/')}/{candidate_id[:2]}/{candidate_id}.png"


def stage_image(staging_dir: str, candidate_id: str, pixels: np.ndarray, lineage: Lineage) -> str:
    uri = staged_uri(staging_dir, candidate_id)
    write_atomic(uri[:-4] + ".json", json.dumps(lineage.to_dict(), sort_keys=True).encode())
    write_atomic(uri, encode_png(pixels))  # the PNG last: its presence means "complete"
    return uri


def load_staged(uri: str) -> tuple[np.ndarray, Lineage] | None:
    """A previously staged image and its lineage, or None if it is missing or unreadable."""
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    try:
        lineage = Lineage(**json.loads(read_bytes(uri[:-4] + ".json")))
        pixels = np.asarray(Image.open(io.BytesIO(read_bytes(uri))).convert("RGB"))
    except Exception:  # a damaged staging file is regenerated, not trusted
        return None
    return pixels, lineage
