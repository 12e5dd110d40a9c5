"""CLIPScore (Hessel et al. 2021) with any open_clip model.

``variant="clipscore"`` is the paper's 2.5 * max(cos, 0); ``variant="cosine"``
is the raw cosine, which keeps order information where the clamp would tie
(torchmetrics reports max(100 cos, 0): same order as ``clipscore``).
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image

from .base import Reward, register_reward
from ..model_io import local_copy, pick_device


@register_reward("clip_score")
class ClipScore(Reward):
    """Args:
    model: open_clip architecture name (``ViT-B-32``, ``ViT-H-14``...) or ``hf-hub:<repo>``.
    pretrained: open_clip pretrained tag (``openai``, ``laion2b_s32b_b79k``); used when no checkpoint.
    checkpoint: a state-dict file (.safetensors / .pt / .bin), local or fsspec URL.
    model_config: a JSON architecture file to register first (custom architectures).
    """

    version = "1"

    def __init__(self, model: str = "ViT-B-32", pretrained: str = "", checkpoint: str = "",
                 model_config: str = "", variant: str = "clipscore", device: str = "auto",
                 cache_dir: str = ""):
        if variant not in ("clipscore", "cosine"):
            raise ValueError(f"clip_score variant must be 'clipscore' or 'cosine', got {variant!r}")
        if pretrained and checkpoint:
            raise ValueError("clip_score: give either 'pretrained' (an open_clip tag) or 'checkpoint' (a file), not both")
        self.model_name, self.pretrained, self.checkpoint = model, pretrained, checkpoint
        self.model_config, self.variant, self.device, self.cache_dir = model_config, variant, device, cache_dir
        self._model = None

    def params(self):
        return {"model": self.model_name, "pretrained": self.pretrained, "checkpoint": self.checkpoint,
                "variant": self.variant}

    def load(self) -> None:
        import open_clip
        import torch

        if self.model_config:
            open_clip.add_model_config(local_copy(self.model_config, self.cache_dir))
        device = pick_device(self.device)
        # A local checkpoint path is accepted as ``pretrained`` by open_clip (it calls load_checkpoint).
        weights = local_copy(self.checkpoint, self.cache_dir) if self.checkpoint else (self.pretrained or None)
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=weights, device=device, cache_dir=self.cache_dir or None)
        model.eval()
        self._model, self._preprocess, self._device = model, preprocess, device
        self._tokenizer = open_clip.get_tokenizer(self.model_name)

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        import torch

        if self._model is None:
            self.load()
        pixels = torch.stack([self._preprocess(im.convert("RGB")) for im in images]).to(self._device)
        tokens = self._tokenizer(list(prompts)).to(self._device)
        with torch.no_grad():
            img = torch.nn.functional.normalize(self._model.encode_image(pixels).float(), dim=-1)
            txt = torch.nn.functional.normalize(self._model.encode_text(tokens).float(), dim=-1)
            cos = (img * txt).sum(-1)
        if self.variant == "clipscore":
            cos = 2.5 * cos.clamp(min=0)
        return [float(c) for c in cos.cpu()]
