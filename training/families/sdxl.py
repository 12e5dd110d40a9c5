"""Stable Diffusion XL: two CLIP text encoders, ``add_time_ids`` and a fp32 VAE; DDPM noise like SD1.x."""
from __future__ import annotations

import torch

from .base import register_family
from .sd import StableDiffusionFamily


@register_family("StableDiffusionXLPipeline")
class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL UNet conditioning: penultimate hidden states of both encoders concatenated, pooled
    embeds from encoder 2, and ``time_ids`` = (original size, crop top-left, target size).

    The data reader resizes and centre-crops every image to ``resolution``, so the time ids
    are the fixed (res, res, 0, 0, res, res) the official Diffusion-DPO SDXL code uses
    (Wallace et al. 2023, arXiv 2311.12908; docs/math.md s.5). The VAE stays in fp32 whatever ``mixed_precision`` says: SDXL's VAE
    overflows in fp16 (NaN latents), as diffusers' SDXL scripts note; only its latents are cast.
    """

    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, config, device="cpu", weight_dtype=torch.float32):
        super(StableDiffusionFamily, self).__init__(config, device, weight_dtype)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        path, rev = config.pretrained_model, config.revision
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev, use_fast=False)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev, use_fast=False)
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev)
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", revision=rev)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev)
        self.noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev)
        self._check_prediction_type()
        self._freeze([self.text_encoder, self.text_encoder_2, self.vae, self.unet],
                     [self.weight_dtype, self.weight_dtype, torch.float32, self.weight_dtype])

    @torch.no_grad()
    def encode_prompts(self, prompts):
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # [B, L, D_i]: penultimate layer, as the SDXL pipeline
            pooled = out[0]  # the last encoder's projected pooled output (text_embeds), [B, P]
        res = self.config.resolution
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=self.device, dtype=self.weight_dtype)
        return {
            "encoder_hidden_states": torch.cat(hidden, dim=-1),  # [B, L, D_1 + D_2]
            "text_embeds": pooled.to(self.weight_dtype),
            "time_ids": time_ids.expand(len(prompts), -1),  # [B, 6]
        }

    def predict(self, noisy, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return self.unet(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added, return_dict=False)[0]
