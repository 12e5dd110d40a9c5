"""``synpref evaluate`` configuration: YAML -> pydantic models, validated once before anything runs.

The models to compare (the first is the baseline), the prompts, the seeds, the judges and where the
outputs go. Each model becomes the build's ``GeneratorConfig`` (``generator_configs``), so evaluation
generates with the build's own machinery; a model's sampling settings default to the baseline's.
"""
from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .config import GeneratorConfig, PromptsConfig, RewardConfig
from .loading import ConfigModel, load_config

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Sampling settings a model inherits from the baseline when it does not set them.
SAMPLING_FIELDS = ("num_inference_steps", "guidance_scale", "height", "width", "scheduler", "dtype", "negative_prompt")


class EvalModel(ConfigModel):
    """One model to evaluate: a diffusers pipeline, optionally with a LoRA or a fine-tuned denoiser.

    Unset sampling settings (None) take the baseline's value; the baseline's unset ones take the
    build's generator defaults. ``scheduler: ""`` keeps the model's own scheduler.
    """

    name: str = Field(min_length=1, max_length=64)
    model: str = Field(min_length=1)
    lora: str = ""
    denoiser: str = ""
    revision: str = ""
    num_inference_steps: Optional[int] = Field(None, ge=1, le=1000)
    guidance_scale: Optional[float] = Field(None, ge=0.0, le=100.0)
    height: Optional[int] = Field(None, ge=8, le=4096)
    width: Optional[int] = Field(None, ge=8, le=4096)
    scheduler: Optional[str] = None
    dtype: Optional[Literal["float32", "float16", "bfloat16"]] = None
    negative_prompt: Optional[str] = None
    device: str = "auto"
    cache_dir: str = ""
    batch_size: int = Field(1, ge=1, le=1024)
    model_copies: int = Field(0, ge=0, le=64)
    accelerator: str = ""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} may only use letters, digits, '_' and '-' (it names image folders and ids)")
        return v

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {v}")
        return v

    @model_validator(mode="after")
    def _one_kind_of_weights(self) -> "EvalModel":
        if self.lora and self.denoiser:
            raise ValueError("give lora or denoiser, not both")
        return self


class Judge(ConfigModel):
    """A reward scoring every image, as the build's ``rewards`` (names are checked at preflight)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    units_per_call: int = Field(1, ge=1)
    model_copies: int = Field(0, ge=0)
    accelerator: str = ""
    group: str = ""

    def to_reward_config(self) -> RewardConfig:
        return RewardConfig(name=self.name, params=dict(self.params), units_per_call=self.units_per_call,
                            model_copies=self.model_copies, accelerator=self.accelerator, group=self.group)


class EvalConfig(ConfigModel):
    """The whole ``synpref evaluate`` job."""

    models: list[EvalModel] = Field(min_length=1)
    prompts: PromptsConfig = PromptsConfig()  # the build's prompts section: a file, builtin or hf://
    seeds_per_prompt: int = Field(2, ge=1, le=1000)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    judges: list[Judge] = Field(min_length=1)
    output_dir: str = Field("out/eval", min_length=1)
    staging_dir: str = ""  # default <output_dir>/_staging, kept: a rerun reuses images whose key matches
    torch_threads: int = Field(1, ge=0, le=256)
    # The run fails (exit 1) when more than this share of a model's images or a judge's scores is lost.
    max_error_share: float = Field(0.1, ge=0.0, le=1.0)
    bootstrap_samples: int = Field(2000, ge=100, le=100000)  # resamples of prompts for the intervals
    beam_options: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> "EvalConfig":
        for what, names in (("model", [m.name for m in self.models]), ("judge", [j.name for j in self.judges])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def baseline(self) -> EvalModel:
        return self.models[0]

    @property
    def staging(self) -> str:
        return self.staging_dir or self.output_dir.rstrip("/") + "/_staging"

    def sampling(self, m: EvalModel) -> dict[str, Any]:
        """The model's sampling settings: its own, else the baseline's, else the generator defaults."""
        out = {}
        for key in SAMPLING_FIELDS:
            value = getattr(m, key)
            if value is None:
                value = getattr(self.baseline, key)
            out[key] = GeneratorConfig.model_fields[key].default if value is None else value
        return out

    def generator_configs(self) -> list[GeneratorConfig]:
        """Each model as the build's generator (id = the model's name), settings resolved."""
        return [GeneratorConfig(id=m.name, model=m.model, revision=m.revision, lora=m.lora, denoiser=m.denoiser,
                                device=m.device, cache_dir=m.cache_dir, batch_size=m.batch_size,
                                model_copies=m.model_copies, accelerator=m.accelerator, **self.sampling(m))
                for m in self.models]

    def reward_configs(self) -> list[RewardConfig]:
        return [j.to_reward_config() for j in self.judges]

    def resolved(self) -> dict[str, Any]:
        """The config as run (every model's sampling settings filled in): ``eval_config.json``."""
        data = self.model_dump(mode="json")
        for m, d in zip(self.models, data["models"]):
            d.update(self.sampling(m))
        data["staging_dir"] = self.staging
        return data


def eval_config_from_dict(data: Any) -> EvalConfig:
    return EvalConfig.from_dict(data)


def load_eval_config(path: str, overrides: list[str] | dict | None = None) -> EvalConfig:
    """``path`` (YAML, any fsspec URL) with ``--set key.path=value`` overrides; one-line ``ValueError``."""
    return load_config(EvalConfig, path, overrides)
