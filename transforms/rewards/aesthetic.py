"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor).

The OpenAI CLIP ViT-L/14 image embedding, L2-normalised, goes through a small MLP trained on SAC + LOGOS +
AVA ratings (``sac+logos+ava1-l14-linearMSE.pth``, a 3.7 MB pickled state dict). The MLP is
Linear(768, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
Linear(64, 16), Linear(16, 1): no activations (they are commented out in the original), so the state dict
keys are ``layers.{0,2,4,6,7}.{weight,bias}``; the widths are read from the file (the first must equal
the CLIP embedding width). Scores are on the raters' scale, about 1-10.

The prompt is ignored: this is a prompt-free image quality prior (``score_batch`` still takes prompts so it
fits the interface). Preprocessing is CLIP's centre crop, shared with ``clip_score`` through the same
``preprocess_key``.
"""
from __future__ import annotations

from typing import Hashable, Sequence

from .base import Reward, register_reward
from .clip_score import (center_crop_key, check_dtype, encode_normalised, load_open_clip, open_clip_files,
                         resolve_dtype)
from ..model_io import pick_device

HEAD_LINEARS = (0, 2, 4, 6, 7)  # nn.Sequential indices of the Linear layers; 1, 3, 5 are Dropout
HEAD_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


def build_head(state: dict, what: str):
    """The improved-aesthetic-predictor MLP (``layers`` = nn.Sequential) with ``state`` loaded, in eval mode."""
    import torch

    expected = {f"layers.{i}.{p}" for i in HEAD_LINEARS for p in ("weight", "bias")}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{what}: not an improved-aesthetic-predictor head (missing {missing[:4]}, "
                         f"unexpected {extra[:4]}); expected keys layers.{{0,2,4,6,7}}.{{weight,bias}}")
    widths = [state["layers.0.weight"].shape[1]] + [state[f"layers.{i}.weight"].shape[0] for i in HEAD_LINEARS]
    for n, i in enumerate(HEAD_LINEARS):
        if tuple(state[f"layers.{i}.weight"].shape) != (widths[n + 1], widths[n]):
            raise ValueError(f"{what}: layers.{i}.weight has shape {tuple(state[f'layers.{i}.weight'].shape)}, "
                             f"expected {(widths[n + 1], widths[n])}")
    if widths[-1] != 1:
        raise ValueError(f"{what}: the head must end in one output, got {widths[-1]}")
    layers, n = [], 0
    for i in range(HEAD_LINEARS[-1] + 1):
        if i in HEAD_LINEARS:
            layers.append(torch.nn.Linear(widths[n], widths[n + 1]))
            n += 1
        else:
            layers.append(torch.nn.Dropout(HEAD_DROPOUTS[i]))
    head = torch.nn.Module()
    head.layers = torch.nn.Sequential(*layers)
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval(), widths[0]


@register_reward("laion_aesthetic")
class LaionAesthetic(Reward):
    """Args:
    head: the MLP weights (required): ``sac+logos+ava1-l14-linearMSE.pth`` (pickled state dict) or a
        ``.safetensors`` conversion; local path or fsspec URL.
    model: open_clip architecture (``ViT-L-14``). pretrained: open_clip tag (default ``openai`` when no
        ``checkpoint``; given QuickGELU as OpenAI trained it). checkpoint: CLIP weights in a file instead (for
        OpenAI weights name the ``ViT-L-14-quickgelu`` architecture). model_config: JSON architecture.
    dtype: the CLIP tower's dtype, ``float32`` (default) or ``float16`` / ``bfloat16`` on CUDA; the head
        always runs in float32.
    """

    version = "1"

    def __init__(self, head: str = "", model: str = "ViT-L-14", pretrained: str = "", checkpoint: str = "",
                 model_config: str = "", device: str = "auto", dtype: str = "float32", cache_dir: str = ""):
        if not head:
            raise ValueError("laion_aesthetic: 'head' is required: sac+logos+ava1-l14-linearMSE.pth from "
                             "github.com/christophschuhmann/improved-aesthetic-predictor, or its .safetensors conversion")
        if pretrained and checkpoint:
            raise ValueError("laion_aesthetic: give either 'pretrained' (an open_clip tag) or 'checkpoint' (a file), not both")
        check_dtype("laion_aesthetic", dtype)
        self.head, self.model_name, self.checkpoint = head, model, checkpoint
        self.pretrained = "" if checkpoint else (pretrained or "openai")
        self.model_config, self.device, self.dtype, self.cache_dir = model_config, device, dtype, cache_dir
        self._model = None

    def params(self):
        return {"head": self.head, "model": self.model_name, "pretrained": self.pretrained,
                "checkpoint": self.checkpoint, "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        return {"head": self.head, **open_clip_files(self.model_name, self.pretrained, self.checkpoint,
                                                     self.model_config)}

    def load(self) -> None:
        from ..checkpoints import load_state_dict

        device = pick_device(self.device)
        torch_dtype = resolve_dtype("laion_aesthetic", self.dtype, device)
        head, width = build_head(load_state_dict(self.head, self.cache_dir), f"laion_aesthetic: {self.head}")
        model, _, cfg = load_open_clip("laion_aesthetic", self.model_name, self.pretrained, self.checkpoint,
                                       self.model_config, device, torch_dtype, self.cache_dir)
        clip_width = getattr(model.visual, "output_dim", width)
        if clip_width != width:
            raise ValueError(f"laion_aesthetic: head {self.head} takes {width}-d embeddings but "
                             f"{self.model_name} gives {clip_width}-d (the released head needs ViT-L/14)")
        key = center_crop_key(cfg)
        if key is None:
            raise ValueError(f"laion_aesthetic: {self.model_name} does not use CLIP's centre-crop preprocessing ({cfg})")
        self._key, self._head = key, head.to(device)
        self._model = model

    def preprocess_key(self) -> Hashable:
        """``("clip_center_crop", size, mean, std)``, the same as ``clip_score``'s for the same CLIP recipe."""
        if self._model is None:
            self.load()
        return self._key

    def preprocess(self, images):
        from .preprocess import clip_center_crop

        _, size, mean, std = self.preprocess_key()
        return clip_center_crop(images, size=size, mean=mean, std=std)

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        """One score per image; ``prompts`` are ignored."""
        import torch

        if self._model is None:
            self.load()
        emb = encode_normalised(self._model, pixels)
        with torch.no_grad():
            scores = self._head.layers(emb).squeeze(-1)
        return [float(s) for s in scores.cpu()]
