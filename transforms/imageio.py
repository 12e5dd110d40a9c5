"""Safe image decoding and tar member names: the one place synpref turns bytes into pixels.

Every reader (scoring staged images, the trainer, inspect, corpus filtering) goes
through ``decode_image``: it refuses decompression bombs by pixel count before
decoding, and raises ``ImageDecodeError`` with a snake_case ``reason`` instead of
PIL's assorted exceptions, so callers can drop a record with a counted reason.
Nothing here unpickles: WebDataset's default decoders unpickle ``.pyd`` members,
so synpref decodes members itself (``decode_members``).
"""
from __future__ import annotations

import io
import json
import math
import re
import warnings
from typing import Any

from PIL import Image

from ..schemas.config import DEFAULT_MAX_PIXELS  # noqa: F401  (a config default; decoders use it here)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# What synpref writes and reads. Limiting PIL's format sniffing keeps odd decoders (EPS runs
# Ghostscript, plus TIFF, PSD, ...) away from untrusted bytes; such data reads as not_an_image.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# key (``%``: the filter's percent-encoded dots, see corpus_writing.encode_key) then one or more .suffix parts
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_\-%]+(\.[A-Za-z0-9_\-]+)+$")


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; ``reason`` is a stable snake_case drop reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str = "RGB", formats: tuple[str, ...] = IMAGE_FORMATS,
    draft_min_side: int = 0,
) -> Image.Image:
    """Decode image bytes to a loaded PIL image in ``mode``.

    PIL's own bomb guard (``Image.MAX_IMAGE_PIXELS``, ~89 MP) still applies on top of ``max_pixels``.
    ``draft_min_side`` > 0: a JPEG is decoded at the smallest of 1/2, 1/4, 1/8 scale (libjpeg's DCT
    scaling, PIL's ``draft``; several times faster) whose shorter side is still >= that many pixels.
    The whole entropy-coded stream is still read, so damaged data is still ``corrupt_image``.

    Raises:
        ImageDecodeError: ``too_many_pixels`` (checked from the header, before decoding),
            ``not_an_image`` (not one of ``formats``) or ``corrupt_image`` (truncated or damaged data).
    """
    if not data:
        raise ImageDecodeError("not_an_image", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
            if draft_min_side > 0 and img.format == "JPEG" and min(w, h) >= 2 * draft_min_side:
                scale = draft_min_side / min(w, h)  # draft keeps both sides >= the size asked for
                img.draft(mode, (math.ceil(w * scale), math.ceil(h * scale)))
            img.load()
            return img.convert(mode) if img.mode != mode else img
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not_an_image", str(e).splitlines()[0][:200]) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_many_pixels", str(e).splitlines()[0][:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError("corrupt_image", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def check_member_name(name: str) -> str:
    """A tar member name synpref writes or reads: ``key.ext[.ext]``, no paths, no dot-dot, no hidden files.

    Raises:
        ValueError: the name could escape a directory on extraction or is not a WebDataset member name.
    """
    if not isinstance(name, str) or not _MEMBER_RE.fullmatch(name):  # fullmatch: "$" would let "x.png\n" through
        raise ValueError(f"unsafe or malformed tar member name {name!r}")
    return name


def decode_members(sample: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Decode one raw WebDataset sample without ever unpickling: use as ``WebDataset(...).map(decode_members)``.

    ``json`` members are parsed, image members (png, jpg, jpeg, webp) become PIL images, ``txt``
    becomes str; anything else (``.pyd``, ``.pickle``, ``.pth``...) stays raw bytes, untouched.
    Member names are rebuilt as ``__key__ + "." + ext`` (exactly the tar name, as WebDataset
    splits it) and checked, so a sample from ``../x.png`` or ``/etc/x.json`` never reaches a caller.

    Raises:
        ImageDecodeError: an image member is not a usable image.
        ValueError: an unsafe member name, or the JSON member does not parse.
    """
    if "__key__" in sample:  # every name first: nothing from a sample with an unsafe name gets decoded
        for key in sample:
            if not key.startswith("__"):
                check_member_name(f"{sample['__key__']}.{key}")
    out: dict[str, Any] = {}
    for key, value in sample.items():
        if key.startswith("__"):
            out[key] = value
            continue
        ext = key.rsplit(".", 1)[-1].lower()
        if ext == "json":
            out[key] = json.loads(value)
        elif ext == "txt":
            out[key] = value.decode("utf-8")
        elif ext in IMAGE_EXTENSIONS:
            out[key] = decode_image(value, max_pixels)
        else:
            out[key] = value
    return out
