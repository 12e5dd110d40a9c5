"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDPM noise, epsilon or v-prediction."""
from __future__ import annotations

import torch

from .base import ModelFamily, register_family


@register_family("StableDiffusionPipeline")
class StableDiffusionFamily(ModelFamily):
    """SD1.x/2.x: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; target eps or v (``prediction_type``)."""

    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"

    def __init__(self, config, device="cpu", weight_dtype=torch.float32):
        super().__init__(config, device, weight_dtype)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path, rev = config.pretrained_model, config.revision
        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev)
        # Training noise follows the DDPM forward process whatever sampler the pipeline ships with.
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev)
        self._check_prediction_type()
        self._freeze([self.text_encoder, self.vae, self.unet])

    def _check_prediction_type(self) -> None:
        kind = self.noise_scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {kind!r}; use epsilon or v_prediction")

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        ids = self._token_ids(self.tokenizer, prompts)
        return {"encoder_hidden_states": self.text_encoder(ids, return_dict=False)[0]}  # [B, L, D]

    @torch.no_grad()
    def encode_images(self, images, generator):
        latent_dist = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        latents = latent_dist.sample(generator=generator) * self.vae.config.scaling_factor  # [N, C, h, w]
        return latents.to(self.weight_dtype)

    def sample_timesteps(self, n, generator):
        return torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator).to(self.device)

    def noisy_input(self, latents, noise, timesteps):
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.noise_scheduler.config.prediction_type == "epsilon":
            return noise
        return self.noise_scheduler.get_velocity(latents, noise, timesteps)

    def predict(self, noisy, timesteps, cond):
        return self.unet(noisy, timesteps, cond["encoder_hidden_states"], return_dict=False)[0]
