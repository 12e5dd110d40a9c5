"""Trainer configuration: YAML -> validated, frozen ``TrainConfig``.

Defaults that the paper does not report (beta, learning rate, optimiser, LoRA
rank) are stated here, in the field docs (PAPER_NOTES s.2 asks for that).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from synpref.schemas.config import RewardConfig, coerce, from_dict, load_yaml
from synpref.transforms.imageio import DEFAULT_MAX_PIXELS

Loss = Literal["rankdpo", "dpo"]
DiscountRank = Literal["label", "model"]
Noise = Literal["shared", "per_image"]
DpoPairs = Literal["best_worst", "all"]
MixedPrecision = Literal["no", "fp16", "bf16"]
WeightingScheme = Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"]
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]
DataFormat = Literal["auto", "ranked", "pairs", "pickapic"]
ReportTo = Literal["none", "tensorboard"]
Finetune = Literal["lora", "full"]

# Diffusion-DPO's beta = 5000 multiplies 0.5 * (model_diff - ref_diff); RankDPO's
# loss has no 0.5, so beta = 2500 puts the same coefficient on each pair (PAPER_NOTES s.3).
DEFAULT_BETA = {"rankdpo": 2500.0, "dpo": 5000.0}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one RankDPO / Diffusion-DPO LoRA run needs.

    Args:
        pretrained_model: a diffusers pipeline folder or hub id; its ``model_index.json`` picks the
            model family (``training/families/``: SD1.x/2.x, SDXL, SD3-class flow matching).
        shards: ranked WebDataset shards: paths, globs, directories or fsspec URLs.
        output_dir: where the LoRA weights and ``train_summary.json`` go.
        revision: model revision when ``pretrained_model`` is a hub id.
        loss: ``rankdpo`` (PAPER_NOTES s.2) or ``dpo`` (Diffusion-DPO on pairs of the ranking, s.3).
        beta: KL strength; ``None`` picks 2500 for rankdpo, 5000 for dpo (the same scale).
        discount_rank: rank tau in the discount, from the labels or the model's current order.
        noise: ``shared`` draws one eps per prompt for all its images (Diffusion-DPO style,
            lower variance); ``per_image`` draws eps per image. The timestep is per prompt in both.
        dpo_pairs: for ``loss: dpo``, train on (rank 1, rank k) only, or on every pair
            with different phi (averaged over pairs, as if exported to Pick-a-Pic pairs).
        lora_rank / lora_alpha: LoRA size and scale; ``lora_alpha`` ``None`` means equal to the rank.
        learning_rate: AdamW learning rate; 1e-4 is diffusers' LoRA default and suits the tiny demo.
        adam_*: AdamW settings (diffusers' training-script defaults).
        max_grad_norm: gradient clipping norm.
        max_steps: optimiser steps; the shards are repeated as often as needed.
        batch_size: prompts per micro-batch (each with all its k images).
        gradient_accumulation_steps: micro-batches per optimiser step.
        resolution: square training resolution in pixels (images are resized and centre-cropped).
        seed: seeds LoRA init, noise, timesteps, VAE sampling and shuffling.
        shuffle: shuffle shard order and samples (seeded); off by default for reproducible order.
        shuffle_buffer: sample shuffle buffer size when ``shuffle`` is on.
        mixed_precision: passed to accelerate's ``Accelerator``; the frozen weights are stored in that dtype
            (the LoRA trains in fp32). ``bf16`` also runs on CPU; ``fp16`` needs a CUDA GPU (refused on CPU).
        log_every: log loss, speed and ETA every this many optimiser steps.
        torch_threads: torch intra-op threads on CPU; 0 leaves torch's default. On small
            CPU machines 1 is much faster than oversubscribing (measured 0.25 s vs 9 s per
            tiny step on 2 busy cores).
        max_image_pixels: an image with more pixels skips its sample as ``too_many_pixels``, refused
            from the header before decoding (a decompression bomb in a shard must not kill a run).
        data_format: what ``shards`` holds: ``auto`` (default: Parquet files are ``pickapic``, tars are ``pairs``
            when their first sample has ``win``/``lose`` images, else ``ranked``; ``training/preflight.py``),
            ``ranked`` (synpref ranked tars, k images per prompt),
            ``pairs`` (synpref pairs tars, each read as k = 2: winner phi 1 rank 1, loser phi 0 rank 2)
            or ``pickapic`` (Pick-a-Pic v2 parquet: ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``;
            a directory means its ``*.parquet``; ties are skipped as ``tie``). See ``training/data.py``.
        min_pair_agreement: ``None`` (off) or a value in [0, 1): pairs whose reward agreement (fraction
            of rewards scoring the higher-phi image strictly higher, as the build computes it) is at or
            below it leave the loss (``RankedItem.pair_mask``); pairs shards drop such samples as
            ``low_agreement``. Needs reward scores, so not with ``pickapic``.
        weighting_scheme: flow-matching (SD3-class) models only: timestep density and loss weighting,
            as diffusers' SD3 scripts (``logit_normal`` default; ``sigma_sqrt`` and ``cosmap`` also
            weight the loss; ``mode`` uses ``mode_scale``; ``none`` is uniform).
        logit_mean / logit_std / mode_scale: parameters of those densities (diffusers' defaults).
        lr_scheduler / lr_warmup_steps: diffusers' ``get_scheduler`` name and warmup steps over
            ``max_steps``; ``constant`` keeps the learning rate fixed.
        checkpointing_steps: every this many optimiser steps save ``output_dir/checkpoint-<step>``
            (LoRA weights, optimiser, LR scheduler, RNG states, data position); ``None`` never.
        checkpoints_total_limit: keep at most this many checkpoints (oldest removed); ``None`` keeps all.
        resume_from_checkpoint: ``latest`` (newest ``checkpoint-*`` in ``output_dir``; starts fresh when
            there is none) or a checkpoint folder; resuming continues exactly where it stopped.
        gradient_checkpointing: recompute the denoiser's activations in the backward pass (diffusers'
            ``enable_gradient_checkpointing``): less memory, about 30% slower, same loss and gradients.
        use_8bit_adam: bitsandbytes' 8-bit AdamW instead of torch's (smaller optimiser state; needs
            ``pip install bitsandbytes``, refused at config time when it is not installed).
        cache_latents: encode each image with the VAE once and keep its latent distribution in host
            memory (keyed by sample key, image index and pixel hash); latents are still sampled every step,
            so losses equal an uncached run. Costs 2 x C x (resolution/8)^2 values per image (128 KiB fp32
            per SD1.x image at 512). See ``training/caching.py``.
        cache_text_embeddings: encode each prompt with the text encoder(s) once and keep the embeddings in
            host memory (keyed by prompt text); SD1.x ~230 KiB, SDXL ~620 KiB, SD3 several MiB per prompt.
        report_to: ``none`` or ``tensorboard``: log the ``train_log.csv`` metrics per step through
            accelerate's trackers to ``output_dir/logs`` (needs ``pip install tensorboard``).
        finetune: ``lora`` (default: a LoRA adapter; the reference is the denoiser with the adapter
            disabled) or ``full`` (every denoiser weight trains, in fp32; the reference is a frozen copy of
            the denoiser made before training, in the frozen weights' dtype). ``full`` saves the denoiser with
            diffusers' ``save_pretrained`` to ``output_dir/unet`` (``transformer`` for SD3), loadable with
            ``UNet2DConditionModel.from_pretrained``; its checkpoints hold the full denoiser (accelerate's
            ``model.safetensors``). ``lora_*`` fields are ignored with ``full``.
        eval_every: every this many optimiser steps (and after the last one) generate one image per
            ``eval_prompts`` entry with the current model, score it with ``eval_rewards`` and append the mean
            per reward to ``output_dir/eval_log.csv`` (step, reward, mean); 0 (default) is off. Evaluation
            uses its own seeded generators and no gradients: training is the same with it on or off.
        eval_prompts: the prompts, or one path to a text file (one prompt a line) or a ``.jsonl`` file
            (``prompt`` field per line).
        eval_rewards: ``[{name, params}]`` as the build's ``rewards`` (``synpref.transforms.rewards``);
            scored together with the build's ``score_ensemble``.
        eval_seed: prompt i is generated with a generator seeded ``eval_seed + i`` (same noise at every eval).
        eval_steps: inference steps per eval image.
        eval_resolution: eval image size in pixels; ``None`` uses ``resolution``.
        eval_guidance_scale: classifier-free guidance for eval images; ``None`` keeps the pipeline's default.
        proportion_empty_prompts: share of samples trained with an empty prompt (all k images of the
            prompt), so the model keeps an unconditional prediction for classifier-free guidance; diffusers'
            name; the official SDXL recipe uses 0.2. Drawn per sample and epoch from ``seed`` (a hash, so the
            same on any number of processes and after a resume). 0 (default) is off.
        validation_shards / validation_fraction / validation_every: held-out preference accuracy
            (``training/validation.py``). ``validation_shards`` are read like ``shards`` (same ``data_format``);
            or ``validation_fraction`` of the prompts in ``shards`` is held out, chosen by a hash of the prompt
            id (Pick-a-Pic: of the caption), so the split is the same on any number of processes and after a
            resume and never overlaps training. Every ``validation_every`` optimiser steps (and after the last
            one) the loss and implicit accuracy on those prompts, with noise and timesteps seeded per prompt
            (the same at every evaluation), go to ``train_log.csv``, the tracker and ``train_summary.json``.
    """

    pretrained_model: str
    shards: list[str]
    output_dir: str
    revision: str | None = None
    loss: Loss = "rankdpo"
    beta: float | None = None
    discount_rank: DiscountRank = "label"
    noise: Noise = "shared"
    dpo_pairs: DpoPairs = "best_worst"
    lora_rank: int = 4
    lora_alpha: float | None = None
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_steps: int = 10
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    resolution: int = 512
    seed: int = 0
    shuffle: bool = False
    shuffle_buffer: int = 100
    mixed_precision: MixedPrecision = "no"
    log_every: int = 1
    torch_threads: int = 0
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    weighting_scheme: WeightingScheme = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    data_format: DataFormat = "auto"
    min_pair_agreement: float | None = None
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    report_to: ReportTo = "none"
    finetune: Finetune = "lora"
    eval_every: int = 0
    eval_prompts: list[str] = dataclasses.field(default_factory=list)
    eval_rewards: list[RewardConfig] = dataclasses.field(default_factory=list)
    eval_seed: int = 0
    eval_steps: int = 20
    eval_resolution: int | None = None
    eval_guidance_scale: float | None = None
    proportion_empty_prompts: float = 0.0
    # ---- held-out validation (training/validation.py); checked in _check_validation
    validation_shards: list[str] = dataclasses.field(default_factory=list)
    validation_fraction: float = 0.0
    validation_every: int = 0

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(hints[f.name], getattr(self, f.name), f.name))
            if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number, got {getattr(self, f.name)!r}")
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA[self.loss])
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        for name in ("beta", "learning_rate", "lora_rank", "max_steps", "batch_size", "gradient_accumulation_steps",
                     "resolution", "log_every", "shuffle_buffer", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("resolution", "eval_resolution"):  # the VAE downsamples by 8, as the build requires
            if getattr(self, name) is not None and getattr(self, name) % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {getattr(self, name)!r}")
        if self.min_pair_agreement is not None and not 0.0 <= self.min_pair_agreement < 1.0:
            raise ValueError(f"min_pair_agreement must be in [0, 1) or null, got {self.min_pair_agreement!r}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts!r}")
        if self.min_pair_agreement is not None and self.data_format == "pickapic":
            raise ValueError("min_pair_agreement needs reward scores; data_format pickapic has none: set it to null")
        for name in ("checkpointing_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or null, got {getattr(self, name)!r}")
        if not self.shards:
            raise ValueError("shards is empty: give shard paths, globs, directories or URLs")
        self._check_eval()
        self._check_validation()
        self.check_environment()

    def _check_eval(self) -> None:
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0 is off), got {self.eval_every!r}")
        for name in ("eval_steps",) + (("eval_resolution",) if self.eval_resolution is not None else ()):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.eval_every:
            return
        if not self.eval_prompts:
            raise ValueError("eval_every > 0 needs eval_prompts (a list of prompts or a prompt file)")
        if not self.eval_rewards:
            raise ValueError("eval_every > 0 needs eval_rewards ([{name, params}] as the build's rewards)")
        from synpref.transforms.rewards import available_rewards

        unknown = [r.name for r in self.eval_rewards if r.name not in available_rewards()]
        if unknown:
            raise ValueError(f"eval_rewards: unknown reward(s) {unknown}; available: {available_rewards()}")
        names = [r.name for r in self.eval_rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"eval_rewards: a reward is named twice in {names}")

    def _check_validation(self) -> None:
        if self.validation_every < 0:
            raise ValueError(f"validation_every must be >= 0 (0 is off), got {self.validation_every!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1) (0 is off), got {self.validation_fraction!r}")
        if self.validation_shards and self.validation_fraction:
            raise ValueError("give validation_shards or validation_fraction, not both")
        has_source = bool(self.validation_shards) or self.validation_fraction > 0
        if self.validation_every and not has_source:
            raise ValueError("validation_every > 0 needs validation_shards or validation_fraction")
        if has_source and not self.validation_every:
            raise ValueError("validation_shards / validation_fraction need validation_every > 0 "
                             "(optimiser steps between evaluations)")

    def check_environment(self) -> None:
        """Refuse settings this machine cannot run, with one line each (checked at config time and by ``train``).

        Raises:
            ValueError: ``mixed_precision: fp16`` without a CUDA GPU; ``use_8bit_adam`` without bitsandbytes;
                ``report_to: tensorboard`` without tensorboard.
        """
        if self.mixed_precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("mixed_precision: fp16 needs a CUDA GPU; on CPU use bf16 or no")
        if self.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("use_8bit_adam needs bitsandbytes, which is not installed: pip install bitsandbytes "
                             "(or set use_8bit_adam: false)")
        if self.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise ValueError("report_to: tensorboard needs tensorboard, which is not installed: pip install tensorboard "
                             "(or set report_to: none)")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build from a plain dict, rejecting unknown keys with the list of valid ones."""
        missing = sorted(n for n in ("pretrained_model", "shards", "output_dir") if values.get(n) is None)
        if missing:
            raise ValueError(f"missing required config keys {missing}")
        return from_dict(cls, values, "train")

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Load a YAML mapping, then apply ``overrides`` (e.g. from ``--set key=value``; strings are coerced)."""
        values = load_yaml(str(path))
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a YAML mapping of config keys, got {type(values).__name__}")
        return cls.from_dict({**values, **(overrides or {})})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (for logs and ``train_summary.json``)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    """Dataclass values (``eval_rewards``' ``RewardConfig``) as plain dicts, for JSON."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
