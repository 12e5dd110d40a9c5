"""Content-addressed image staging: each image is encoded once and stored under the hash of its inputs.

An image's key is a hash of everything that determines its pixels (model files,
revision, pipeline settings, prompt, seed), so a rerun reuses a staged image only
when it would generate the same image; change the steps, the scheduler or the seed
and the key changes. A sidecar JSON (written after the image) holds the key, the
image's sha256 and its lineage: no sidecar, or a hash mismatch, means regenerate.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Optional

import fsspec
import numpy as np
from PIL import Image

from ..schemas.config import GeneratorConfig
from ..schemas.records import Lineage
from ..core.fileio import dumps_strict, read_bytes, write_atomic
from .imageio import decode_image
from .generators.weights import denoiser_weights, files_checksum, lora_file
from .model_io import json_digest, model_fingerprint

# Bump when synpref changes how a config turns into pixels (e.g. noise sampling), so old staging is not reused.
GENERATION_SCHEME = "1"
# GeneratorConfig fields that do not change pixels: naming, where weights are cached, which device runs it.
_NOT_PIXEL_FIELDS = {"id", "cache_dir", "device", "model_copies", "accelerator"}
# Trained weights on top of the model: in the fingerprint by the checksum of their files.
_WEIGHT_FIELDS = ("lora", "denoiser")
# GeneratorConfig fields whose null / empty value means "the pipeline's or the family's default".
_OPTIONAL_FIELDS = {"guidance_scale", "prior_num_inference_steps", "prior_guidance_scale", "decoder_guidance_scale",
                    "call_args"}


# output.image_format -> file extension of staged files and shard members.
IMAGE_EXT = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_png(pixels: np.ndarray) -> bytes:
    """Deterministic PNG bytes (no metadata, no timestamps)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def encode_image(pixels: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """Deterministic bytes in ``image_format`` (png, jpeg or webp): fixed settings, no metadata.

    jpeg: baseline, ``jpeg_quality``, 4:2:0 subsampling, no optimize/progressive passes. webp: lossless.
    """
    if image_format == "png":
        return encode_png(pixels)
    buf = io.BytesIO()
    img = Image.fromarray(pixels, mode="RGB")
    if image_format == "jpeg":
        img.save(buf, format="JPEG", quality=int(jpeg_quality), subsampling=2, optimize=False, progressive=False)
    elif image_format == "webp":
        img.save(buf, format="WEBP", lossless=True, quality=100, method=4, exact=True)
    else:
        raise ValueError(f"unknown image format {image_format!r}; one of {sorted(IMAGE_EXT)}")
    return buf.getvalue()


def encoding_tag(image_format: str = "png", jpeg_quality: int = 95) -> str:
    """What of the output encoding decides staged bytes: ``png``, ``webp`` or ``jpeg-q<quality>``."""
    return f"jpeg-q{int(jpeg_quality)}" if image_format == "jpeg" else image_format


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def generator_fingerprint(config: GeneratorConfig, encoding: str = "png") -> str:
    """Everything about a generator that decides the staged bytes, except the prompt and the seed:
    its pixels and the ``encoding`` (``encoding_tag``). PNG keeps the fingerprint it always had."""
    # Settings left at null / empty are left out, so configs from before those settings existed keep
    # their fingerprint (and their staged images); set, they (call_args included) are part of the key.
    fields = {k: v for k, v in config.model_dump().items()
              if k not in _NOT_PIXEL_FIELDS.union(_WEIGHT_FIELDS) and not (k in _OPTIONAL_FIELDS and v in (None, {}))}
    doc = {"scheme": GENERATION_SCHEME, "config": fields, "model": model_fingerprint(config.model, config.revision)}
    for name in _WEIGHT_FIELDS:  # trained weights by content, not by path; absent ones leave old keys unchanged
        if getattr(config, name, ""):
            doc[name] = files_checksum(lora_file(config.lora) if name == "lora" else denoiser_weights(config.denoiser))
    if encoding != "png":
        doc["encoding"] = encoding
    return json_digest(doc)


def generation_key(generator_fp: str, prompt: str, seed: int) -> str:
    """The content address of one image: sha256 of (generator fingerprint, prompt, seed)."""
    return hashlib.sha256(f"{generator_fp}\n{seed}\n{prompt}".encode()).hexdigest()


def staged_uri(staging_dir: str, key: str, ext: str = "png") -> str:
    return f"{staging_dir.rstrip('/')}/{key[:2]}/{key}.{ext}"


def _sidecar(uri: str) -> str:
    return uri.rsplit(".", 1)[0] + ".json"


def stage_image(staging_dir: str, key: str, data: bytes, lineage: Lineage, ext: str = "png") -> tuple[str, str]:
    """Write encoded image bytes, then the sidecar that vouches for them. Returns (uri, sha256)."""
    uri = staged_uri(staging_dir, key, ext)
    sha = hashlib.sha256(data).hexdigest()
    write_atomic(uri, data)
    write_atomic(_sidecar(uri), dumps_strict({"key": key, "sha256": sha, "lineage": lineage.to_dict()},
                                               sort_keys=True).encode())
    return uri, sha


def find_staged(staging_dir: str, key: str, ext: str = "png") -> Optional[tuple[str, str, Lineage]]:
    """(uri, sha256, lineage) of a complete, intact staged image with this key, else None.

    The image bytes are re-hashed: a truncated or damaged file is regenerated, never trusted.
    """
    uri = staged_uri(staging_dir, key, ext)
    fs, path = fsspec.core.url_to_fs(_sidecar(uri))
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
