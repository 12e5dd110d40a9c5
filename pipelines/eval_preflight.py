"""Checks before ``synpref evaluate`` generates anything: every problem is one line, raised as
``ValueError`` or ``FileNotFoundError`` (the CLI prints it and exits 2).

Models, LoRA files and denoiser folders must exist; a LoRA must fit its base model (checked from the
LoRA file's header and the base denoiser's config, no weights loaded); a denoiser folder must be the
base pipeline's denoiser class; every judge is instantiated and loaded here, so a judge that cannot
load fails now, not after the models have generated every image.
"""
from __future__ import annotations

from .preflight import check_prompt_source, check_writable
from ..schemas.eval_config import EvalConfig
from ..transforms.generators.weights import check_denoiser, lora_file, lora_misfit
from ..transforms.model_io import check_location, is_remote, looks_like_hub_id


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def check_eval_models(cfg: EvalConfig) -> None:
    import diffusers

    for i, m in enumerate(cfg.models):
        where = f"models.{i} ({m.name})"
        check_location(m.model, f"{where}.model")
        scheduler = cfg.sampling(m)["scheduler"]
        if scheduler and not isinstance(getattr(diffusers, scheduler, None), type):
            raise ValueError(f"{where}.scheduler: {scheduler!r} is not a diffusers scheduler class "
                             "(e.g. DDIMScheduler, EulerDiscreteScheduler)")
        local_model = not (looks_like_hub_id(m.model) or is_remote(m.model))
        if m.lora:
            check_location(m.lora, f"{where}.lora")
            check_location(lora_file(m.lora), f"{where}.lora")
            if local_model:
                try:
                    misfit = lora_misfit(m.model, m.lora, m.cache_dir)
                except (OSError, ValueError) as e:
                    raise ValueError(f"{where}.lora: cannot read {lora_file(m.lora)} ({_one_line(e)})") from None
                if misfit:
                    raise ValueError(f"{where}.lora: {m.lora} does not fit {m.model}: {misfit}")
        if m.denoiser:
            check_location(m.denoiser, f"{where}.denoiser")
            if local_model:
                try:
                    check_denoiser(m.model, m.denoiser, m.cache_dir)
                except (OSError, ValueError) as e:
                    raise ValueError(f"{where}.denoiser: {' '.join(str(e).split())}") from None


def check_judges(cfg: EvalConfig) -> None:
    """Instantiate and load every judge on the launcher (weights included): a judge that fails fails now."""
    from ..transforms.rewards import check_rewards, create_reward

    check_rewards(cfg.reward_configs(), "config.judges")
    for i, j in enumerate(cfg.judges):
        try:
            reward = create_reward(j.name, j.params)
            for what, location in reward.files().items():
                if location:
                    check_location(location, f"judges.{i} ({j.name}): {what}")
            reward.load()
        except FileNotFoundError as e:
            raise FileNotFoundError(" ".join(str(e).split())) from None
        except Exception as e:  # any failure to build or load the judge: the job could not score
            raise ValueError(f"judges.{i} ({j.name}): does not load ({_one_line(e)})") from None


def preflight_evaluate(cfg: EvalConfig) -> None:
    """Everything that can be checked before generation: prompts, models and weights, judges, output."""
    check_prompt_source(cfg.prompts)
    check_eval_models(cfg)
    check_judges(cfg)
    check_writable(cfg.output_dir, "output_dir")
    if cfg.staging_dir:
        check_writable(cfg.staging_dir, "staging_dir")
