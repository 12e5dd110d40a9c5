"""A tiny Stable Diffusion pipeline that is *trained*, briefly, so preference training means something.

The random tiny pipeline (``tiny_models.build_tiny_sd_pipeline``) exercises every code path, but it
cannot show that preference labels steer a model, for two measured reasons (docs/benchmarks.md, "Do
labels reach the model?"):

* its random VAE is not an autoencoder: the image a trainer encodes and the image the same latent
  decodes to are unrelated (GroupNorm erases an image's mean, so the decoded brightness does not depend
  on the input's at all: correlation -0.01 over 32 images), so labels on decoded images say nothing
  about the latents the trainer sees;
* its random UNet is not a denoiser: DPO makes the model denoise winners better than the reference
  does, and only for a denoiser does that raise the winners' likelihood. With a trained VAE and a
  random UNet, training on brightness labels made images consistently *darker*.

This module trains both in about a minute on one CPU thread: a VAE with fewer channels (about 80K
parameters) as a plain autoencoder on procedural images (a colour, a gradient, soft blobs, a noise
level: brightness, colour, smoothness and texture all vary), then the UNet with the standard
epsilon-prediction objective on those images' latents, conditioned on the builtin prompts. The
loops are hand-written: diffusers ships its training recipes as example scripts, not as a library
function. Same seed, same bytes (one thread, seeded generators).
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from .tiny_models import build_tiny_sd_pipeline

IMAGE_SIZE = 64


def procedural_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` RGB images in [-1, 1], [n, 3, 64, 64]: a colour, a linear gradient, soft blobs and noise."""
    base = torch.rand(n, 3, 1, 1, generator=generator) * 0.8 + 0.1
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, IMAGE_SIZE), torch.linspace(-1, 1, IMAGE_SIZE), indexing="ij")
    slope = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.6
    angle = torch.rand(n, 1, 1, 1, generator=generator) * 6.2832
    image = base + slope * (xx * torch.cos(angle) + yy * torch.sin(angle))
    blobs = torch.nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=generator), size=IMAGE_SIZE,
                                            mode="bilinear", align_corners=False)
    noise = torch.rand(n, 1, 1, 1, generator=generator) * 0.15 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE,
                                                                              generator=generator)
    return (image + 0.15 * blobs + noise).clamp(0, 1) * 2 - 1


def small_vae():
    """An ``AutoencoderKL`` with the tiny pipeline's 8x downsampling and 4 latent channels, but 8/16
    channels in 4 norm groups: small enough to train in seconds, and two channels per group leave room
    for an image's mean to pass (one channel per group normalises it away)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=IMAGE_SIZE)


def train_vae(vae, steps: int, generator: torch.Generator, batch_size: int = 16, lr: float = 3e-3) -> float:
    """Reconstruction (MSE) with a negligible KL term; sets ``scaling_factor`` to 1 / latent std, as SD
    chose 0.18215, so the UNet sees unit-variance latents. Returns the last loss."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    vae.train()
    for _ in range(steps):
        images = procedural_images(batch_size, generator)
        posterior = vae.encode(images).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.sample(generator=generator)).sample, images)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(procedural_images(64, generator)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return loss.item()


def train_unet(pipe, prompts: list[str], steps: int, generator: torch.Generator, batch_size: int = 16,
               lr: float = 1e-3) -> float:
    """Epsilon prediction on the VAE's latents of procedural images, each paired with a random prompt
    (the images do not depend on it: this teaches denoising, not prompt following). Returns the last loss."""
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        embeddings = pipe.text_encoder(ids)[0]
    optimizer = torch.optim.Adam(pipe.unet.parameters(), lr=lr)
    pipe.unet.train()
    for _ in range(steps):
        with torch.no_grad():
            posterior = pipe.vae.encode(procedural_images(batch_size, generator)).latent_dist
            latents = posterior.sample(generator=generator) * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        text = embeddings[torch.randint(0, len(prompts), (batch_size,), generator=generator)]
        prediction = pipe.unet(noise_schedule.add_noise(latents, noise, t), t, text).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pipe.unet.eval()
    return loss.item()


def builtin_prompts() -> list[str]:
    """The builtin prompt set's texts (the prompts the demo builds on)."""
    lines = resources.files("synpref.jobs").joinpath("builtin_prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines if line.strip()]


def save_trained_tiny_sd(path: str | os.PathLike, seed: int = 0, vae_steps: int = 300, unet_steps: int = 200,
                         scheduler: str = "pndm") -> str:
    """Build the tiny SD pipeline with ``small_vae``, train VAE then UNet, ``save_pretrained`` to ``path``.

    Writes ``synpref_pretraining.json`` beside the model (steps and last losses) and returns ``path``.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-reproducible on CPU
    try:
        pipe = build_tiny_sd_pipeline(seed=seed, scheduler=scheduler)  # seeds torch itself
        pipe.register_modules(vae=small_vae())
        generator = torch.Generator().manual_seed(seed)
        vae_loss = train_vae(pipe.vae, vae_steps, generator)
        unet_loss = train_unet(pipe, builtin_prompts(), unet_steps, generator)
    finally:
        torch.set_num_threads(previous_threads)
    pipe.save_pretrained(str(path), safe_serialization=True)
    record = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "vae_loss": vae_loss,
              "unet_loss": unet_loss}
    (Path(path) / "synpref_pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
    return str(path)
