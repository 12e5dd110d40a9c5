"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

Weights: ``xswu/HPSv2`` on the Hugging Face hub, ``HPS_v2_compressed.pt`` (v2.0) or
``HPS_v2.1_compressed.pt`` (v2.1), pickled dicts ``{"state_dict": {...}}`` that load weights-only, or their
safetensors conversion (``python -m synpref.transforms.checkpoints HPS_v2.1_compressed.pt HPS_v2.1.safetensors``).
The model is built with no pretrained weights and the HPS state dict loaded into it: unlike the ``hpsv2``
package, the 3.9 GB LAION CLIP-H base weights are never downloaded (HPS overwrites all of them).

Preprocessing is HPS's own, **not** a crop: longest side to the model's image size (224), padded with black to
a square, CLIP mean/std (``preprocess.clip_pad_square``). As in HPS, the resize is torchvision's antialiased
bicubic on the float tensor (HPS converts to a tensor first), not Pillow's on the 8-bit image: that difference
alone moved scores by 5e-3 relative (``bench/parity/parity.py hpsv2`` measures the agreement).

Score: the cosine between the L2-normalised image and prompt features, in [-1, 1] (typically about
0.2-0.35). The papers and the ``hpsv2`` package print it x100; this reward returns the raw cosine (same order).
v2.0 and v2.1 scores are not comparable; ``version`` is recorded in the manifest.
"""
from __future__ import annotations

import os
from typing import Hashable, Sequence

from .base import Reward, register_reward
from .clip_score import check_dtype, encode_normalised, load_open_clip, open_clip_files, resolve_dtype
from ..model_io import pick_device

HPS_VERSIONS = ("v2.0", "v2.1")
# the released file names, so a version that contradicts the file is caught at config time
_RELEASED = {"hps_v2_compressed": "v2.0", "hps_v2.1_compressed": "v2.1"}


@register_reward("hpsv2")
class HPSv2(Reward):
    """Args:
    checkpoint: the HPS weights (required): ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt`` or a
        ``.safetensors`` conversion; local path or fsspec URL (``hf://xswu/HPSv2/HPS_v2.1_compressed.pt``
        with huggingface_hub installed, ``gs://...``).
    version: ``v2.1`` (default) or ``v2.0``: which release the checkpoint is.
    model: open_clip architecture (``ViT-H-14``); model_config: a JSON architecture to register first.
    dtype: ``float32`` (default); ``float16`` / ``bfloat16`` on CUDA only.
    """

    version = "2"  # 2: float-tensor resize as HPS (1 resized the 8-bit image with Pillow)

    def __init__(self, checkpoint: str = "", version: str = "v2.1", model: str = "ViT-H-14",
                 model_config: str = "", device: str = "auto", dtype: str = "float32", cache_dir: str = ""):
        if not checkpoint:
            raise ValueError("hpsv2: 'checkpoint' is required: HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt "
                             "with version v2.0) from the hub repo xswu/HPSv2, or its .safetensors conversion")
        if version not in HPS_VERSIONS:
            raise ValueError(f"hpsv2: version must be one of {list(HPS_VERSIONS)}, got {version!r}")
        stem = os.path.basename(checkpoint.rstrip("/")).lower().rsplit(".", 1)[0]
        if _RELEASED.get(stem, version) != version:
            raise ValueError(f"hpsv2: checkpoint {checkpoint} is HPS {_RELEASED[stem]}, but version is {version!r}")
        check_dtype("hpsv2", dtype)
        self.checkpoint, self.hps_version, self.model_name = checkpoint, version, model
        self.model_config, self.device, self.dtype, self.cache_dir = model_config, device, dtype, cache_dir
        self._model = None

    def params(self):
        return {"version": self.hps_version, "model": self.model_name, "checkpoint": self.checkpoint,
                "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        return open_clip_files(self.model_name, "", self.checkpoint, self.model_config)

    def load(self) -> None:
        device = pick_device(self.device)
        torch_dtype = resolve_dtype("hpsv2", self.dtype, device)
        model, tokenizer, cfg = load_open_clip("hpsv2", self.model_name, "", self.checkpoint, self.model_config,
                                               device, torch_dtype, self.cache_dir)
        size = cfg.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        self._key = ("clip_pad_square", int(size), (0, 0, 0), tuple(float(m) for m in cfg["mean"]),
                     tuple(float(s) for s in cfg["std"]))
        self._tokenizer, self._model = tokenizer, model

    def preprocess_key(self) -> Hashable:
        """``("clip_pad_square", size, fill, mean, std)``, from the loaded model (loads on first call)."""
        if self._model is None:
            self.load()
        return self._key

    def preprocess(self, images):
        from .preprocess import clip_pad_square

        _, size, fill, mean, std = self.preprocess_key()
        return clip_pad_square(images, size=size, fill=fill, mean=mean, std=std)

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        if self._model is None:
            self.load()
        img, txt = encode_normalised(self._model, pixels, self._tokenizer(list(prompts)))
        return [float(c) for c in (img * txt).sum(-1).cpu()]
