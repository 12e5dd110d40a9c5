"""RankDPO / Diffusion-DPO LoRA fine-tuning of a Stable Diffusion UNet on ranked shards.

Flat, in the diffusers training-script style: ``parse_args`` -> ``main``, which calls
``train(config)``. The reference model is the same UNet with its LoRA adapter disabled
(PAPER_NOTES s.3), so there is no second copy. The math is in ``losses.py``.

    python -m synpref.training.train --config jobs/demo_train.yaml --set max_steps=20
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from synpref.training.config import TrainConfig
from synpref.training.data import RankedBatch, RankedShards, iter_batches
from synpref.training.losses import ranked_dpo_loss, rankdpo_loss_batched

logger = logging.getLogger("synpref.training")

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    """Parse ``--config PATH`` and repeated ``--set KEY=VALUE``."""
    parser = argparse.ArgumentParser(description="RankDPO / Diffusion-DPO LoRA training on ranked shards.")
    parser.add_argument("--config", required=True, help="YAML file with TrainConfig fields (see jobs/demo_train.yaml).")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override one config field, e.g. --set max_steps=20; repeatable. "
        "Lists as YAML: --set 'shards=[a.tar, b.tar]'.",
    )
    return parser.parse_args(input_args)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``["k=v", ...]`` -> dict; values stay strings (TrainConfig coerces) except ``[...]`` YAML lists."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value) if value.lstrip().startswith("[") else value
    return overrides


def main(argv: list[str] | None = None) -> dict:
    """CLI entry point: load the config, train, return the summary."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(TrainConfig.from_yaml(args.config, overrides=parse_overrides(args.set)))


@dataclass
class Models:
    """The frozen pipeline parts plus the UNet that carries the trainable LoRA adapter."""

    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module  # may be wrapped by accelerate (DDP); unwrap before disabling adapters
    noise_scheduler: object
    device: torch.device
    weight_dtype: torch.dtype


def load_models(
    config: TrainConfig, device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float32
) -> Models:
    """Load tokenizer, text encoder, VAE, UNet and a DDPM noise scheduler from ``pretrained_model``; all frozen."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path, rev = config.pretrained_model, config.revision
    models = Models(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev),
        # Training noise follows the DDPM forward process whatever sampler the pipeline ships with.
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev),
        device=torch.device(device),
        weight_dtype=weight_dtype,
    )
    for module in (models.text_encoder, models.vae, models.unet):
        module.requires_grad_(False)
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)
    models.text_encoder.eval()
    models.vae.eval()
    return models


def add_lora(unet: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Attach the trainable LoRA adapter (B = 0, so the model starts equal to the reference); return its parameters."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGET_MODULES,
        )
    )
    cast_training_params(unet, dtype=torch.float32)  # LoRA trains in fp32 even over an fp16/bf16 base
    return [p for p in unet.parameters() if p.requires_grad]


def compute_loss(models: Models, batch: RankedBatch, config: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """One preference loss on a ranked batch: encode, noise, denoise with model and reference, compare.

    ``generator`` (CPU) drives VAE sampling, timesteps and noise, so a fixed seed gives a fixed loss.
    """
    device, dtype = models.device, models.weight_dtype
    unet, sched = models.unet, models.noise_scheduler
    group = batch.group.to(device)  # [N]
    n_prompts, n_images = len(batch.prompts), len(batch.group)

    with torch.no_grad():
        tokenizer = models.tokenizer
        ids = tokenizer(
            batch.prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        text = models.text_encoder(ids, return_dict=False)[0][group]  # [B, L, D] -> [N, L, D]
        latent_dist = models.vae.encode(batch.images.to(device, dtype)).latent_dist
        latents = latent_dist.sample(generator=generator) * models.vae.config.scaling_factor  # [N, C, h, w]

    # One timestep per prompt; eps per prompt ("shared", as Diffusion-DPO shares it within a pair) or per image.
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (n_prompts,), generator=generator).to(device)[group]
    shared = config.noise == "shared"
    noise = torch.randn((n_prompts if shared else n_images, *latents.shape[1:]), generator=generator)
    noise = noise.to(device, latents.dtype)
    if shared:
        noise = noise[group]  # [B, C, h, w] -> [N, C, h, w]
    noisy = sched.add_noise(latents, noise, timesteps)
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {sched.config.prediction_type!r}; use epsilon or v_prediction")

    def per_image_mse(pred: torch.Tensor) -> torch.Tensor:
        return ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))  # [N]

    model_err = per_image_mse(unet(noisy, timesteps, text, return_dict=False)[0])
    base = getattr(unet, "module", unet)  # DDP wraps the UNet; adapters live on the inner module
    with torch.no_grad():
        base.disable_adapters()
        ref_err = per_image_mse(unet(noisy, timesteps, text, return_dict=False)[0])
        base.enable_adapters()

    phi, rank = batch.phi.to(device), batch.rank.to(device)
    if config.loss == "rankdpo":
        return rankdpo_loss_batched(model_err, ref_err, phi, rank, group, config.beta, config.discount_rank)
    return ranked_dpo_loss(model_err, ref_err, phi, rank, group, config.beta, config.dpo_pairs)


def train(config: TrainConfig) -> dict:
    """Train a LoRA adapter with ``config``; save it and ``train_summary.json`` to ``config.output_dir``.

    Returns:
        The summary: steps, first_loss, last_loss, losses, seconds, skipped (bad samples per reason),
        config, lora_path (the safetensors file) and output_dir.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # ---- setup
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    mixed_precision = config.mixed_precision
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning("mixed_precision=fp16 needs a GPU; training in fp32 on CPU instead")
        mixed_precision = "no"
    accelerator = Accelerator(
        mixed_precision=mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    logger.info("train config: %s", json.dumps(config.to_dict()))
    set_seed(config.seed)

    # ---- models: frozen base + LoRA adapter on the UNet
    models = load_models(config, accelerator.device, WEIGHT_DTYPES[mixed_precision])
    params = add_lora(models.unet, config)
    optimizer = torch.optim.AdamW(
        params,
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
    )
    models.unet, optimizer = accelerator.prepare(models.unet, optimizer)
    models.unet.train()

    # ---- data
    dataset = RankedShards(
        config.shards,
        config.resolution,
        shuffle_seed=config.seed if config.shuffle else None,
        shuffle_buffer=config.shuffle_buffer,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        max_image_pixels=config.max_image_pixels,
    )
    batches = iter_batches(dataset, config.batch_size)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)

    # ---- training loop
    losses: list[float] = []
    step_loss = 0.0
    start = time.perf_counter()
    while len(losses) < config.max_steps:
        with accelerator.accumulate(models.unet):
            loss = compute_loss(models, next(batches), config, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
        step_loss += accelerator.gather(loss.detach()).mean().item() / config.gradient_accumulation_steps
        if not accelerator.sync_gradients:
            continue
        losses.append(step_loss)
        step_loss = 0.0
        step = len(losses)
        if step % config.log_every == 0 or step == config.max_steps:
            rate = step / (time.perf_counter() - start)
            eta = (config.max_steps - step) / rate
            logger.info("step %d/%d loss %.5f %.2f steps/s eta %.0fs", step, config.max_steps, losses[-1], rate, eta)
    seconds = time.perf_counter() - start

    # ---- save the LoRA (diffusers format, loadable with pipe.load_lora_weights) and a summary
    out = Path(config.output_dir)
    accelerator.wait_for_everyone()
    summary = {
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "losses": losses,
        "seconds": seconds,
        "skipped": dict(dataset.skipped),
        "config": config.to_dict(),
        "lora_path": str(out / LORA_WEIGHT_NAME_SAFE),
        "output_dir": str(out),
    }
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(models.unet)
        StableDiffusionPipeline.save_lora_weights(
            out,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            safe_serialization=True,
            # Stores lora_alpha, so a reload scales the adapter as trained even when alpha != rank.
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        )
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        logger.info("saved LoRA to %s (%d steps, %.1fs, loss %.5f -> %.5f)",
                    summary["lora_path"], len(losses), seconds, losses[0], losses[-1])
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
