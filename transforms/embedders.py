"""Image embedders for semantic deduplication (``filter.semantic_dedup.embedder``): one interface, a registry.

An embedder turns decoded images into L2-normalised float32 vectors, so the dot product of two rows is
their cosine similarity. ``open_clip`` is the learned one SemDeDup uses (arXiv 2303.09540, section 3): any
open_clip model, loaded by the same code as the ``clip_score`` reward (``load_open_clip``: safetensors or
weights-only checkpoints, no download when a checkpoint is given) and preprocessed by the same recipe.
``thumbnail`` is a non-learned baseline: it sees re-encodes, resizes, small crops and colour shifts, not
meaning. Like rewards, constructing one is cheap (checked before the pipeline starts) and ``load()`` runs
on workers only.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from PIL import Image

from ..core.registry import Registry
from .model_io import json_digest, model_fingerprint, pick_device
from .rewards.clip_score import (center_crop_key, check_dtype, encode_normalised, load_open_clip,
                                 open_clip_files, resolve_dtype)

EMBEDDERS = Registry("embedder")


def available_embedders() -> list[str]:
    return EMBEDDERS.names()


def create_embedder(name: str, params: dict[str, Any] | None = None, where: str = "") -> "Embedder":
    """The embedder ``name`` built with ``params`` (ValueError naming ``where`` for an unknown name or bad params)."""
    cls = EMBEDDERS.lookup(name, f"{where}.name" if where else "")
    try:
        return cls(**(params or {}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where + '.params: ' if where else ''}embedder {name}: {' '.join(str(e).split())}") \
            from None


class Embedder(abc.ABC):
    """Decoded images -> an (n, dim) float32 array with unit-length rows (a zero row: similar to nothing)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"

    def load(self) -> None:
        """Load weights (on workers only)."""

    @abc.abstractmethod
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        ...

    def draft_side(self) -> int:
        """The short side a JPEG may be decoded down to without changing what the embedder sees much (0: full size)."""
        return 0

    def params(self) -> dict[str, Any]:
        return {}

    def files(self) -> dict[str, str]:
        return {}

    def describe(self) -> dict[str, Any]:
        """Name, version, params and a fingerprint of the weight files (as ``Reward.describe``): the
        embeddings Parquet is reused only when this matches."""
        files = {k: v for k, v in self.files().items() if v}
        info = {"name": self.name, "version": self.version, "params": self.params(),
                "files": {k: {"location": v, "fingerprint": model_fingerprint(v)} for k, v in sorted(files.items())}}
        info["fingerprint"] = json_digest(info)
        return info


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@EMBEDDERS.register("open_clip")
class OpenClipEmbedder(Embedder):
    """The image tower of any open_clip model (the ``clip_score`` reward's loading and preprocessing).

    Args:
        model: open_clip architecture name (``ViT-B-32``...), ``hf-hub:<repo>``, or the name of the JSON in
            ``model_config``.
        pretrained: open_clip pretrained tag (``openai``, ``laion2b_s34b_b79k``); used when no checkpoint.
        checkpoint: a state-dict file (.safetensors / .pt / .bin), local or fsspec URL.
        model_config: a JSON architecture file to register first; its file name (without ``.json``) is the model.
        dtype: ``float32``; ``float16`` / ``bfloat16`` on CUDA only.
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "", checkpoint: str = "", model_config: str = "",
                 device: str = "auto", cache_dir: str = "", dtype: str = "float32"):
        if pretrained and checkpoint:
            raise ValueError("give either 'pretrained' (an open_clip tag) or 'checkpoint' (a file), not both")
        check_dtype("open_clip embedder", dtype)
        if model_config:
            if Path(model_config.split("?")[0]).stem != model:
                raise ValueError(f"model {model!r} must be the name of model_config's file "
                                 f"({Path(model_config).name}); open_clip registers it under that name")
        elif not model.startswith(("hf-hub:", "local-dir:")):
            import open_clip

            if open_clip.get_model_config(model) is None:
                raise ValueError(f"unknown open_clip model {model!r} (open_clip.list_models() lists them; "
                                 "or give model_config)")
        self.model_name, self.pretrained = model, pretrained
        self.checkpoint, self.model_config = checkpoint, model_config
        self.device, self.cache_dir, self.dtype = device, cache_dir, dtype
        self._model = None

    def params(self):
        return {"model": self.model_name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
                "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        return open_clip_files(self.model_name, self.pretrained, self.checkpoint, self.model_config)

    def load(self) -> None:
        device = pick_device(self.device)
        dtype = resolve_dtype("open_clip embedder", self.dtype, device)
        model, _, cfg = load_open_clip("open_clip embedder", self.model_name, self.pretrained, self.checkpoint,
                                       self.model_config, device, dtype, self.cache_dir)
        self._key = center_crop_key(cfg)
        if self._key is None:  # not CLIP's crop recipe: open_clip's own transform
            from open_clip.transform import PreprocessCfg, image_transform_v2

            self._transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
        self._model = model

    def draft_side(self) -> int:
        if self._model is None:
            self.load()
        return self._key[1] if self._key else 0

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        from .rewards.preprocess import clip_center_crop

        if self._model is None:
            self.load()
        if self._key:
            pixels = clip_center_crop(images, size=self._key[1], mean=self._key[2], std=self._key[3])
        else:
            pixels = torch.stack([self._transform(im.convert("RGB")) for im in images])
        return _unit_rows(encode_normalised(self._model, pixels).cpu().numpy())


@EMBEDDERS.register("thumbnail")
class ThumbnailEmbedder(Embedder):
    """Not learned: the image shrunk to ``side`` x ``side`` (box filter, aspect ignored), each channel's mean
    removed, as one vector. Cosine similarity is then the correlation of two thumbnails: high for
    re-encodes, resizes, small crops and brightness / colour shifts; it knows nothing of meaning. A flat
    image (one colour) has no pattern to compare: its row is zero, similar to nothing (exact dedup still
    catches identical bytes).

    Args:
        side: thumbnail side in pixels (the vector has 3 * side * side entries).
    """

    def __init__(self, side: int = 8):
        if not isinstance(side, int) or not 4 <= side <= 64:
            raise ValueError(f"side must be an integer in [4, 64], got {side!r}")
        self.side = side

    def params(self):
        return {"side": self.side}

    def draft_side(self) -> int:
        return self.side

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = []
        for im in images:
            a = np.asarray(im.convert("RGB").resize((self.side, self.side), Image.BOX), dtype=np.float64)
            rows.append((a - a.mean(axis=(0, 1))).reshape(-1))
        return _unit_rows(np.stack(rows))
