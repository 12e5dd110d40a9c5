"""In-memory caches of the frozen encoders' outputs, so each sample is encoded once, not once per epoch.

``cache_latents``: the VAE's latent distribution (its ``parameters``, mean and log-variance stacked,
[2C, h, w] per image) keyed by ``(prompt_id, image index, hash of the decoded pixels)``. The latent is
still *sampled* every step from the cached distribution with the step's generator, so a cached run
draws the same random numbers and gives the same losses as an uncached one (tested).
``cache_text_embeddings``: the family's ``encode_prompts`` tensors per prompt text (the encoding
depends on the text only, so repeated prompts share an entry).

Both caches live in host memory (CPU tensors, moved to the device when used), one cache per process
holding only that process's share of the data. Memory per entry, in the frozen weights' dtype
(4 bytes fp32, 2 bf16/fp16):

* latents: 2 x C x (R/8)^2 values per image; SD1.x/SDXL (C = 4) at R = 512: 128 KiB fp32 per image,
  at 1024: 512 KiB; SD3 (C = 16) at 1024: 2 MiB. A 10k-prompt, k = 4 set at 512: ~5 GiB fp32.
* text: SD1.x 77 x 768 (231 KiB fp32), SD2.x 77 x 1024 (308 KiB), SDXL 77 x 2048 + 1280 pooled
  (~620 KiB), SD3 (CLIP 77 + T5 tokens) x 4096 + 2048 pooled: several MiB per prompt.

The caches never evict: enable them when the share of the data fits in RAM.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch


def _digest(image: torch.Tensor) -> str:
    return hashlib.blake2b(image.detach().cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()


class _CachedVAE:
    """Stands in for ``family.vae`` while the family's ``encode_images`` runs: ``encode`` returns given moments."""

    def __init__(self, vae, parameters: torch.Tensor):
        self._vae = vae
        self._parameters = parameters

    def encode(self, *args, **kwargs):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        from diffusers.models.modeling_outputs import AutoencoderKLOutput

        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(self._parameters))

    def __getattr__(self, name):  # config, dtype, device ... of the real VAE
        return getattr(self._vae, name)


class EncoderCache:
    """Caches VAE latent distributions and/or prompt embeddings of a ``ModelFamily``.

    Args:
        models: the loaded family (its ``vae``, ``encode_images`` and ``encode_prompts`` are used).
        latents: cache the VAE latent distributions.
        text: cache the prompt embeddings.

    Attributes:
        vae_images_encoded / prompts_encoded: how many images / prompts went through the real encoders.
    """

    def __init__(self, models, latents: bool = False, text: bool = False):
        if latents and not hasattr(models, "vae"):
            raise ValueError(f"cache_latents: model family {type(models).__name__} has no vae")
        self.models = models
        self.cache_latents = latents
        self.cache_text = text
        self._latents: dict[tuple, torch.Tensor] = {}
        self._text: dict[str, dict[str, torch.Tensor]] = {}
        self.vae_images_encoded = 0
        self.prompts_encoded = 0
        # the VAE's output memory format (CPU convolutions may return channels_last); cached batches are
        # rebuilt in the same format, so the denoiser runs the same kernels and the losses match exactly
        self._memory_format = torch.contiguous_format

    @property
    def nbytes(self) -> int:
        """Host memory held by the cached tensors."""
        n = sum(t.numel() * t.element_size() for t in self._latents.values())
        return n + sum(t.numel() * t.element_size() for d in self._text.values() for t in d.values())

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Like ``models.encode_prompts``: tensors with leading dimension B = len(prompts)."""
        if not self.cache_text:
            self.prompts_encoded += len(prompts)
            return self.models.encode_prompts(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text))
        if missing:
            encoded = self.models.encode_prompts(missing)
            self.prompts_encoded += len(missing)
            for i, prompt in enumerate(missing):
                self._text[prompt] = {k: v[i].detach().cpu().clone() for k, v in encoded.items()}
        device = self.models.device
        return {k: torch.stack([self._text[p][k] for p in prompts]).to(device) for k in self._text[prompts[0]]}

    def encode_images(self, batch, generator: torch.Generator) -> torch.Tensor:
        """Like ``models.encode_images(batch.images, generator)``, drawing the same random numbers."""
        models = self.models
        if not self.cache_latents:
            self.vae_images_encoded += len(batch.images)
            return models.encode_images(batch.images, generator)
        group = batch.group.tolist()
        index = [group[:j].count(g) for j, g in enumerate(group)]  # image index within its prompt
        keys = [(batch.prompt_ids[g], i, _digest(img)) for g, i, img in zip(group, index, batch.images)]
        missing = [j for j, key in enumerate(keys) if key not in self._latents]
        if missing:
            vae = models.vae
            with torch.no_grad():
                params = vae.encode(batch.images[missing].to(models.device, vae.dtype)).latent_dist.parameters
            self.vae_images_encoded += len(missing)
            if params.dim() == 4 and not params.is_contiguous() and params.is_contiguous(memory_format=torch.channels_last):
                self._memory_format = torch.channels_last
            for j, p in zip(missing, params):
                self._latents[keys[j]] = p.detach().cpu().clone()
        parameters = torch.stack([self._latents[key] for key in keys]).to(models.device)
        parameters = parameters.contiguous(memory_format=self._memory_format)
        with self._vae_returning(parameters):
            return models.encode_images(batch.images, generator)

    @contextmanager
    def _vae_returning(self, parameters: torch.Tensor):
        vae = self.models.vae
        self.models.vae = _CachedVAE(vae, parameters)
        try:
            yield
        finally:
            self.models.vae = vae
