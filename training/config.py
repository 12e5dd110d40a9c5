"""Trainer configuration: one pydantic model, loaded like every config (``schemas/loading.py``).

Defaults that the paper (arXiv 2410.18013) does not report (beta, learning rate, optimiser, LoRA rank)
are stated in the field docs. Reward names in ``eval_rewards`` are plug-ins, checked by ``preflight_train``.
"""
from __future__ import annotations

import importlib.util
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..schemas.config import DEFAULT_MAX_PIXELS, Location, RewardConfig
from ..schemas.loading import ConfigModel, one_or_many

# Diffusion-DPO's beta = 5000 multiplies 0.5 * (model_diff - ref_diff); RankDPO's loss has no 0.5,
# so beta = 2500 puts the same coefficient on each pair (docs/math.md s.4-5).
DEFAULT_BETA = {"rankdpo": 2500.0, "dpo": 5000.0}
Positive = Annotated[int, Field(gt=0)]


class TrainConfig(ConfigModel):
    """Everything one RankDPO / Diffusion-DPO run needs (each field's docstring says what it does)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    pretrained_model: Location
    """A diffusers pipeline folder or hub id; its ``model_index.json`` picks the model family
    (``training/families/``: SD1.x/2.x, SDXL, SD3-class flow matching)."""
    shards: Annotated[list[str], BeforeValidator(one_or_many)]
    """Ranked WebDataset shards: paths, globs, directories or fsspec URLs."""
    output_dir: Location
    """Where the LoRA weights, ``train_summary.json`` and checkpoints go."""
    revision: Optional[str] = None
    """Model revision when ``pretrained_model`` is a hub id."""
    loss: Literal["rankdpo", "dpo"] = "rankdpo"
    """``rankdpo`` (docs/math.md s.4) or ``dpo`` (Diffusion-DPO on pairs of the ranking, s.5)."""
    beta: Optional[float] = Field(None, gt=0)
    """KL strength; null picks 2500 for rankdpo, 5000 for dpo (the same scale)."""
    discount_rank: Literal["label", "model"] = "label"
    """Rank tau in the discount, from the labels or the model's current order."""
    noise: Literal["shared", "per_image"] = "shared"
    """``shared``: one eps per prompt for all its images (Diffusion-DPO style, lower variance);
    ``per_image``: eps per image. The timestep is per prompt in both."""
    dpo_pairs: Literal["best_worst", "all"] = "best_worst"
    """For ``loss: dpo``: (rank 1, rank k) only, or every pair with different phi (averaged over pairs)."""
    lora_rank: Positive = 4
    lora_alpha: Optional[float] = None
    """LoRA scale numerator (scale = alpha / rank); null means equal to the rank."""
    learning_rate: float = Field(1e-4, gt=0)
    """AdamW learning rate; 1e-4 is diffusers' LoRA default and suits the tiny demo."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_steps: Positive = 10
    """Optimiser steps; the shards are repeated as often as needed."""
    batch_size: Positive = 4
    """Prompts per micro-batch (each with all its k images)."""
    gradient_accumulation_steps: Positive = 1
    resolution: Positive = 512
    """Square training resolution in pixels (resized and centre-cropped); a multiple of 8 (the VAE's factor)."""
    seed: int = 0
    """Seeds LoRA init, noise, timesteps, VAE sampling and shuffling."""
    shuffle: bool = False
    """Shuffle shard order and samples (seeded); off by default for reproducible order."""
    shuffle_buffer: Positive = 100
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Passed to accelerate's ``Accelerator``; the frozen weights are stored in that dtype (the LoRA trains
    in fp32). ``bf16`` also runs on CPU; ``fp16`` needs a CUDA GPU (refused on CPU)."""
    log_every: Positive = 1
    torch_threads: int = Field(0, ge=0)
    """Torch intra-op threads on CPU; 0 leaves torch's default (1 is much faster on small busy CPUs)."""
    max_image_pixels: Positive = DEFAULT_MAX_PIXELS
    """An image with more pixels skips its sample as ``too_many_pixels``, refused from the header."""
    weighting_scheme: Literal["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"] = "logit_normal"
    """Flow-matching (SD3-class) models only: timestep density and loss weighting, as diffusers' SD3 scripts."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    checkpointing_steps: Optional[int] = Field(None, gt=0)
    """Every this many optimiser steps save ``output_dir/checkpoint-<step>``; null never."""
    checkpoints_total_limit: Optional[int] = Field(None, gt=0)
    """Keep at most this many checkpoints (oldest removed); null keeps all."""
    resume_from_checkpoint: Optional[str] = None
    """``latest`` (newest ``checkpoint-*`` in ``output_dir``; starts fresh when there is none) or a folder."""
    init_lora: Optional[str] = None
    """A folder with ``pytorch_lora_weights.safetensors`` (as this trainer writes) to start the LoRA from
    instead of its random init, e.g. the previous round's (``synpref run``, ``train_from: previous``); the
    DPO reference stays the base model. Same ``lora_rank`` as when it was trained."""
    data_format: Literal["auto", "ranked", "pairs", "pickapic"] = "auto"
    """``auto`` (Parquet files are ``pickapic``; tars are ``pairs`` when their first sample has ``win``/``lose``
    images, else ``ranked``; ``training/preflight.py``), ``ranked`` (synpref ranked tars), ``pairs`` (synpref
    pairs tars, read as k = 2) or ``pickapic`` (Pick-a-Pic v2 parquet: ``caption``, ``jpg_0``, ``jpg_1``,
    ``label_0``). See ``training/data.py``."""
    # ---- held-out validation (training/validation.py)
    validation_shards: list[str] = Field(default_factory=list)
    """Shards read like ``shards`` (same ``data_format``) whose pairs are only evaluated, never trained on."""
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Or hold out this share of the prompts in ``shards``, chosen by a hash of the prompt id (Pick-a-Pic: of
    the caption): the same split on any number of processes and after a resume; 0 is off."""
    validation_every: int = Field(0, ge=0)
    """Every this many optimiser steps (and after the last) the loss and implicit accuracy on the held-out
    pairs, with noise and timesteps seeded per prompt, go to train_log.csv, the tracker and train_summary.json."""
    min_pair_agreement: Optional[float] = Field(None, ge=0, lt=1)
    """Pairs whose reward agreement is at or below this leave the loss (null: off); not with ``pickapic``."""
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    """bitsandbytes' 8-bit AdamW (refused at config time when bitsandbytes is not installed)."""
    cache_latents: bool = False
    """Encode each image with the VAE once and keep its latent distribution in host memory
    (``training/caching.py``); losses equal an uncached run."""
    cache_text_embeddings: bool = False
    report_to: Literal["none", "tensorboard"] = "none"
    finetune: Literal["lora", "full"] = "lora"
    """``lora`` (an adapter; the reference is the denoiser with it disabled) or ``full`` (every denoiser
    weight trains; the reference is a frozen copy; saved to ``output_dir/unet`` or ``transformer``)."""
    eval_every: int = Field(0, ge=0)
    """Every this many optimiser steps (and after the last) generate one image per ``eval_prompts`` entry,
    score it with ``eval_rewards`` and append the means to ``output_dir/eval_log.csv``; 0 is off."""
    eval_prompts: Annotated[list[str], BeforeValidator(one_or_many)] = []
    """The prompts, or one path to a text file (one prompt a line) or a ``.jsonl`` file."""
    eval_rewards: list[RewardConfig] = []
    """``[{name, params}]`` as the build's ``rewards``."""
    eval_seed: int = 0
    eval_steps: Positive = 20
    eval_resolution: Optional[int] = Field(None, gt=0)
    """Eval image size in pixels; null uses ``resolution``."""
    eval_guidance_scale: Optional[float] = None
    proportion_empty_prompts: float = Field(0.0, ge=0, le=1)
    """Share of samples trained with an empty prompt (classifier-free guidance); the SDXL recipe uses 0.2."""

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if data.get("beta") is None:
                data["beta"] = DEFAULT_BETA.get(data.get("loss", "rankdpo"), DEFAULT_BETA["rankdpo"])
            if data.get("lora_alpha") is None:
                data["lora_alpha"] = data.get("lora_rank", 4)
        return data

    @field_validator("resolution", "eval_resolution")
    @classmethod
    def _vae_multiple(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if not self.shards:
            raise ValueError("shards is empty: give shard paths, globs, directories or URLs")
        if self.min_pair_agreement is not None and self.data_format == "pickapic":
            raise ValueError("min_pair_agreement needs reward scores; data_format pickapic has none: set it to null")
        if self.validation_shards and self.validation_fraction:
            raise ValueError("give validation_shards or validation_fraction, not both")
        has_source = bool(self.validation_shards) or self.validation_fraction > 0
        if self.validation_every and not has_source:
            raise ValueError("validation_every > 0 needs validation_shards or validation_fraction")
        if has_source and not self.validation_every:
            raise ValueError("validation_shards / validation_fraction need validation_every > 0 "
                             "(optimiser steps between evaluations)")
        if self.init_lora and self.finetune == "full":
            raise ValueError("init_lora starts a LoRA; finetune: full trains the whole denoiser: use one of them")
        if self.eval_every:
            if not self.eval_prompts:
                raise ValueError("eval_every > 0 needs eval_prompts (a list of prompts or a prompt file)")
            if not self.eval_rewards:
                raise ValueError("eval_every > 0 needs eval_rewards ([{name, params}] as the build's rewards)")
            names = [r.name for r in self.eval_rewards]
            if len(set(names)) != len(names):
                raise ValueError(f"eval_rewards: a reward is named twice in {names}")
        self.check_environment()
        return self

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
