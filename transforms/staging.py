"""Content-addressed image staging: each image is encoded once and stored under the hash of its inputs.

An image's key is a hash of everything that determines its pixels (model files,
revision, pipeline settings, prompt, seed), so a rerun reuses a staged image only
when it would generate the same image; change the steps, the scheduler or the seed
and the key changes. A sidecar JSON (written after the image) holds the key, the
image's sha256 and its lineage: no sidecar, or a hash mismatch, means regenerate.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Optional

import fsspec
import numpy as np
from PIL import Image

from synpref.schemas.config import GeneratorConfig
from synpref.schemas.records import Lineage
from synpref.transforms.fileio import read_bytes, write_atomic
from synpref.transforms.imageio import decode_image
from synpref.transforms.model_io import json_digest, model_fingerprint

# Bump when synpref changes how a config turns into pixels (e.g. noise sampling), so old staging is not reused.
GENERATION_SCHEME = "1"
# GeneratorConfig fields that do not change pixels: naming, where weights are cached, which device runs it.
_NOT_PIXEL_FIELDS = {"id", "cache_dir", "device", "model_copies", "accelerator"}


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes (no metadata, no timestamps)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def generator_fingerprint(config: GeneratorConfig) -> str:
    """Everything about a generator that decides pixels, except the prompt and the seed."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_PIXEL_FIELDS}
    return json_digest({"scheme": GENERATION_SCHEME, "config": fields,
                    "model": model_fingerprint(config.model, config.revision)})


def generation_key(generator_fp: str, prompt: str, seed: int) -> str:
    """The content address of one image: sha256 of (generator fingerprint, prompt, seed)."""
    return hashlib.sha256(f"{generator_fp}\n{seed}\n{prompt}".encode()).hexdigest()


def staged_uri(staging_dir: str, key: str) -> str:
    return f"{staging_dir.rstrip('/')}/{key[:2]}/{key}.png"


def stage_image(staging_dir: str, key: str, data: bytes, lineage: Lineage) -> tuple[str, str]:
    """Write encoded image bytes, then the sidecar that vouches for them. Returns (uri, sha256)."""
    uri = staged_uri(staging_dir, key)
    sha = hashlib.sha256(data).hexdigest()
    write_atomic(uri, data)
    write_atomic(uri[:-4] + ".json", json.dumps({"key": key, "sha256": sha, "lineage": lineage.to_dict()},
                                                sort_keys=True).encode())
    return uri, sha


def find_staged(staging_dir: str, key: str) -> Optional[tuple[str, str, Lineage]]:
    """(uri, sha256, lineage) of a complete, intact staged image with this key, else None.

    The image bytes are re-hashed: a truncated or damaged file is regenerated, never trusted.
    """
    uri = staged_uri(staging_dir, key)
    fs, path = fsspec.core.url_to_fs(uri[:-4] + ".json")
    if not fs.exists(path):
        return None
    try:
        side = json.loads(fs.cat_file(path))
        if side.get("key") != key or hashlib.sha256(read_bytes(uri)).hexdigest() != side["sha256"]:
            return None
        return uri, side["sha256"], Lineage(**side["lineage"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_staged_image(uri: str) -> Image.Image:
    """The RGB image staged at ``uri`` (decoded with synpref's pixel limit)."""
    return decode_image(read_bytes(uri))
