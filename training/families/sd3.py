"""Stable Diffusion 3 class: rectified-flow (flow-matching) transformer with CLIP-L, CLIP-G and T5 encoders.

RankDPO on flow matching (arXiv 2410.18013 Eq. 5-7; docs/math.md s.4): the per-image error is against the flow target
(noise - x_0) at one sigma per prompt, instead of the eps error; timesteps are drawn as in
diffusers' SD3 training scripts (``weighting_scheme``, default ``logit_normal``), whose loss
weighting multiplies the squared error (all ones for ``logit_normal``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ModelFamily, model_index, register_family


@register_family("StableDiffusion3Pipeline")
class StableDiffusion3Family(ModelFamily):
    """x_t = (1 - sigma) x_0 + sigma * noise, target = noise - x_0, sigmas from the
    ``FlowMatchEulerDiscreteScheduler`` (its shift included); latents are
    (VAE sample - shift_factor) * scaling_factor. Without a T5 (``text_encoder_3`` null),
    its slot is zeros, as the SD3 pipeline does.
    """

    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    # diffusers' SD3 LoRA script default: attention projections of both streams
    lora_target_modules = [
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    ]
    max_sequence_length = 77  # the SD3 training scripts' default T5 length

    def __init__(self, config, device="cpu", weight_dtype=torch.float32):
        super().__init__(config, device, weight_dtype)
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        path, rev = config.pretrained_model, config.revision
        load = dict(revision=rev)
        self.tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **load)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **load)
        self.text_encoder = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **load)
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **load)
        self.tokenizer_3 = self.text_encoder_3 = None
        if self._has_component(path, rev, "text_encoder_3"):
            self.tokenizer_3 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", **load)
            self.text_encoder_3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **load)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **load)
        self.transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **load)
        self.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **load)
        encoders = [self.text_encoder, self.text_encoder_2] + ([self.text_encoder_3] if self.text_encoder_3 else [])
        # The VAE encodes in fp32 (cheap next to the transformer, and safe in fp16 runs).
        self._freeze([*encoders, self.vae, self.transformer],
                     [self.weight_dtype] * len(encoders) + [torch.float32, self.weight_dtype])
        self._sigmas = self.noise_scheduler.sigmas.to(self.device)  # [T], descending, shift applied
        self._timesteps = self.noise_scheduler.timesteps.to(self.device)  # [T], = sigma * num_train_timesteps

    @staticmethod
    def _has_component(path: str, revision: str | None, name: str) -> bool:
        entry = model_index(path, revision).get(name)
        return bool(entry) and entry[0] is not None

    def _token_ids(self, tokenizer, prompts, max_length):
        return tokenizer(
            prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        clip_hidden, clip_pooled = [], []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self._token_ids(tokenizer, prompts, 77), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])  # [B, 77, D_i], penultimate layer as the SD3 pipeline
            clip_pooled.append(out[0])  # [B, P_i] projected pooled output
        clip = torch.cat(clip_hidden, dim=-1)  # [B, 77, D_L + D_G]
        joint_dim = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is not None:
            ids = self._token_ids(self.tokenizer_3, prompts, self.max_sequence_length)
            t5 = self.text_encoder_3(ids)[0]  # [B, L_t5, D_t5]
        else:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, joint_dim, device=self.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [B, 77, D_t5]: zero-pad to T5's width
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2).to(self.weight_dtype),  # [B, 77 + L_t5, D_t5]
            "pooled_projections": torch.cat(clip_pooled, dim=-1).to(self.weight_dtype),  # [B, P_L + P_G]
        }

    @torch.no_grad()
    def encode_images(self, images, generator):
        latents = self.vae.encode(images.to(self.device, torch.float32)).latent_dist.sample(generator=generator)
        shift = self.vae.config.shift_factor or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.weight_dtype)  # [N, C, h, w]

    def sample_timesteps(self, n, generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        cfg = self.config
        u = compute_density_for_timestep_sampling(
            cfg.weighting_scheme, n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale, generator=generator,
        )  # [n] in [0, 1]
        indices = (u * self.noise_scheduler.config.num_train_timesteps).long().clamp(0, len(self._timesteps) - 1)
        return self._timesteps[indices.to(self.device)]

    def _sigma(self, timesteps: torch.Tensor, ndim: int) -> torch.Tensor:
        """sigma of each timestep (looked up in the schedule, as diffusers' ``get_sigmas``), shaped to broadcast."""
        index = (self._timesteps[None, :] == timesteps[:, None]).float().argmax(dim=1)  # [N]
        return self._sigmas[index].reshape(-1, *([1] * (ndim - 1)))  # [N, 1, 1, 1]

    def noisy_input(self, latents, noise, timesteps):
        sigma = self._sigma(timesteps, latents.ndim).to(latents.dtype)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def loss_weight(self, timesteps):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.config.weighting_scheme, self._sigma(timesteps, 1)).float()  # [N]

    def lora_layers(self, denoiser):
        # Transformer LoRAs load in PEFT key format (lora_A / lora_B), as diffusers' SD3 script saves them;
        # convert_state_dict_to_diffusers would rename to_q/k/v/out to the UNet-era lora.down/up keys,
        # which StableDiffusion3Pipeline.load_lora_weights silently drops.
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(denoiser)

    def predict(self, noisy, timesteps, cond):
        return self.transformer(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]
