"""Trained weights on top of a diffusers model: a LoRA folder or a fully fine-tuned denoiser folder.

``synpref train`` writes either ``pytorch_lora_weights.safetensors`` (diffusers' LoRA format, loaded
with ``pipe.load_lora_weights``) or ``<output_dir>/unet`` (``transformer`` for SD3), a folder that
``<Denoiser>.from_pretrained`` loads. This module finds those files, checksums them (the checksum is
part of an image's staging key: changed weights never reuse stale images) and checks, without
loading any weights, that a LoRA targets modules that exist, with the right shapes, in the base
model's denoiser.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import fsspec

from ..model_io import local_copy

LORA_FILE = "pytorch_lora_weights.safetensors"
DENOISERS = ("unet", "transformer")
# diffusers' own LoRA keys and peft's: <component>.<module path>.<suffix>
_DOWN = (".lora.down.weight", ".lora_A.weight", ".lora_A.default.weight")
_UP = (".lora.up.weight", ".lora_B.weight", ".lora_B.default.weight")


def lora_file(location: str) -> str:
    """The safetensors file of a LoRA given as a folder (as ``synpref train`` writes) or as the file."""
    return location if location.endswith(".safetensors") else f"{location.rstrip('/')}/{LORA_FILE}"


def files_checksum(location: str) -> str:
    """sha256 over every file under ``location`` (a file or a folder): names and full contents.

    Trained weights change in place under the same path, so the contents are hashed, not sizes
    or times. A missing location hashes to a marker (preflight reports it before any work).
    """
    fs, path = fsspec.core.url_to_fs(location[len("file://"):] if location.startswith("file://") else location)
    if not fs.exists(path):
        return hashlib.sha256(f"missing:{location}".encode()).hexdigest()
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    h = hashlib.sha256()
    for name in files:
        h.update(name[len(path):].lstrip("/").encode() + b"\0")
        with fs.open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def model_index(model: str, cache_dir: str = "") -> dict:
    """The base pipeline's ``model_index.json`` (local folder or fsspec URL)."""
    with open(os.path.join(local_copy(model, cache_dir), "model_index.json")) as f:
        return json.load(f)


def denoiser_component(model: str, cache_dir: str = "") -> tuple[str, str]:
    """(component name, diffusers class) of the pipeline's denoiser: ``unet`` or ``transformer``."""
    index = model_index(model, cache_dir)
    for name in DENOISERS:
        entry = index.get(name)
        if isinstance(entry, list) and len(entry) == 2 and entry[1]:
            return name, entry[1]
    raise ValueError(f"{model}: model_index.json names no unet or transformer")


def denoiser_folder(location: str, component: str) -> str:
    """The folder holding the denoiser's ``config.json``: ``location`` itself or ``location/<component>``
    (``synpref train --set finetune=full`` writes ``<output_dir>/unet``)."""
    local = local_copy(location)
    if os.path.isfile(os.path.join(local, "config.json")):
        return local
    return os.path.join(local, component)


def denoiser_weights(location: str) -> str:
    """The denoiser's own folder inside ``location`` (itself, or its ``unet``/``transformer`` subfolder), so a
    checksum covers the weights and not the training logs and checkpoints beside them."""
    fs, path = fsspec.core.url_to_fs(location[len("file://"):] if location.startswith("file://") else location)
    for sub in ("", *DENOISERS):
        folder = f"{path.rstrip('/')}/{sub}" if sub else path
        if fs.exists(f"{folder.rstrip('/')}/config.json"):
            return f"{location.rstrip('/')}/{sub}" if sub else location
    return location


def check_denoiser(model: str, denoiser: str, cache_dir: str = "") -> None:
    """A denoiser folder must exist, hold a config and be the base pipeline's denoiser class."""
    component, cls = denoiser_component(model, cache_dir)
    folder = denoiser_folder(denoiser, component)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"denoiser folder {denoiser} has no config.json (nor {component}/config.json)")
    with open(config_path) as f:
        found = json.load(f).get("_class_name", "")
    if found and found != cls:
        raise ValueError(f"denoiser {denoiser} is a {found}; {model} needs a {cls}")


def _empty_denoiser(model: str, cache_dir: str = ""):
    """The base denoiser built from its config on the meta device: module names and shapes, no weights."""
    import diffusers
    from accelerate import init_empty_weights

    component, cls_name = denoiser_component(model, cache_dir)
    cls = getattr(diffusers, cls_name)
    config = cls.load_config(os.path.join(local_copy(model, cache_dir), component))
    with init_empty_weights():
        return component, cls.from_config(config)


def _lora_entries(path: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """{key prefix before the LoRA suffix: {"down"|"up": shape}} of a LoRA safetensors file (header only)."""
    from safetensors import safe_open

    out: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(local_copy(path), "pt") as f:
        for key in f.keys():
            for side, suffixes in (("down", _DOWN), ("up", _UP)):
                suffix = next((s for s in suffixes if key.endswith(s)), None)
                if suffix:
                    out.setdefault(key[: -len(suffix)], {})[side] = tuple(f.get_slice(key).get_shape())
    return out


def lora_misfit(model: str, lora: str, cache_dir: str = "") -> Optional[str]:
    """Why the LoRA at ``lora`` does not fit ``model``'s denoiser (one line), or None when it fits.

    Reads the LoRA file's header and builds the denoiser on the meta device: every targeted module
    must exist and have the in/out sizes of the LoRA's down/up matrices. Keys for other components
    (``text_encoder.``) are left to diffusers at load. ``None`` also when the file is in a format this
    check does not read (kohya's ``lora_unet_`` keys): diffusers converts those when it loads them.
    """
    component, denoiser = _empty_denoiser(model, cache_dir)
    entries = {k: v for k, v in _lora_entries(lora_file(lora)).items() if k.startswith(component + ".")}
    if not entries:
        return None
    modules = dict(denoiser.named_modules())
    for key, shapes in sorted(entries.items()):
        name = key[len(component) + 1:]
        module = modules.get(name)
        if module is None:
            return f"it targets {component} module {name!r}, which {model} does not have"
        n_in = getattr(module, "in_features", getattr(module, "in_channels", None))
        n_out = getattr(module, "out_features", getattr(module, "out_channels", None))
        down, up = shapes.get("down"), shapes.get("up")
        if (down and n_in is not None and down[1] != n_in) or (up and n_out is not None and up[0] != n_out):
            return (f"{component} module {name!r} is {n_in}->{n_out} in {model}, but the LoRA's matrices are "
                    f"{list(down or [])} and {list(up or [])}")
    return None
