"""Evaluation during training: generate images for fixed prompts with the current model and score them.

``eval_every: N`` in the ``TrainConfig`` runs ``Evaluator.run`` every N optimiser steps and after the
last one. It builds the family's diffusers pipeline from the components the trainer already loaded
(the denoiser with its trained LoRA adapter, or the fully fine-tuned denoiser), generates one image per
eval prompt with a generator seeded ``eval_seed + i`` (the same noise at every evaluation, so the
curve shows the model, not the sampling), scores the images with the build's ``score_ensemble`` and
appends ``step, reward, mean`` rows to ``output_dir/eval_log.csv``.

Evaluation draws no random numbers from the training generator or the global RNG, computes no
gradients and puts the denoiser back in training mode, so a run with evaluation trains exactly as
one without (tested).
"""
from __future__ import annotations

import contextlib
import csv
import inspect
import json
import logging
import math
from pathlib import Path

import torch

logger = logging.getLogger("synpref.training")

EVAL_COLUMNS = ["step", "reward", "mean"]


def load_eval_prompts(entries: list[str]) -> list[str]:
    """``eval_prompts`` as a list: the prompts themselves, or one path to a ``.txt`` (a prompt a line)
    or ``.jsonl`` (``prompt`` field) file."""
    if len(entries) == 1 and Path(entries[0]).is_file():
        path = Path(entries[0])
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            prompts = [json.loads(line)["prompt"] for line in lines]
        else:
            prompts = lines
        if not prompts:
            raise ValueError(f"eval_prompts file {path} has no prompts")
        return prompts
    return list(entries)


def build_pipeline(models, denoiser: torch.nn.Module):
    """The family's diffusers pipeline over the already-loaded components and ``denoiser`` (unwrapped).

    Only the sampling scheduler is read from ``pretrained_model``; optional components the trainer does
    not load (safety checker, feature extractor, image encoder) are left out.
    """
    import diffusers

    cls = getattr(diffusers, models.pipeline_class)
    components = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "scheduler") or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        if name == models.denoiser_name:
            components[name] = denoiser
        elif name == "requires_safety_checker":
            components[name] = False
        elif getattr(models, name, None) is not None:
            components[name] = getattr(models, name)
        elif param.default is None or param.default is inspect.Parameter.empty:
            components[name] = None  # optional part the trainer does not load (or a missing T5: SD3 allows it)
    config = models.config
    pipe = cls.from_pretrained(config.pretrained_model, revision=config.revision, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Evaluator:
    """Generates and scores the eval prompts; owns ``eval_log.csv``.

    Args:
        config: the ``TrainConfig`` (``eval_*`` fields).
        models: the trainer's loaded ``ModelFamily``.
        log_path: the CSV (``output_dir/eval_log.csv``).
    """

    def __init__(self, config, models, log_path: str | Path):
        self.config = config
        self.models = models
        self.log_path = Path(log_path)
        self.prompts = load_eval_prompts(config.eval_prompts)
        self._rewards = None
        self.history: list[dict] = []  # {"step", reward name: mean, ...} per evaluation of this run

    @property
    def rewards(self):
        """The eval rewards, created and loaded on first use."""
        if self._rewards is None:
            from ..transforms.rewards import create_reward

            self._rewards = [create_reward(r.name, r.params) for r in self.config.eval_rewards]
            for reward in self._rewards:
                reward.load()
        return self._rewards

    def due(self, step: int) -> bool:
        """Evaluate after this optimiser step: every ``eval_every`` steps and after the last."""
        every = self.config.eval_every
        return bool(every) and (step % every == 0 or step == self.config.max_steps)

    @torch.no_grad()
    def generate(self, denoiser: torch.nn.Module, autocast=None) -> list:
        """One PIL image per eval prompt from ``denoiser`` (unwrapped), prompt i seeded ``eval_seed + i``."""
        config, models = self.config, self.models
        size = config.eval_resolution or config.resolution
        was_training = denoiser.training
        denoiser.eval()
        try:
            pipe = build_pipeline(models, denoiser)
            kwargs = {"num_inference_steps": config.eval_steps, "height": size, "width": size, "output_type": "pil"}
            if config.eval_guidance_scale is not None:
                kwargs["guidance_scale"] = config.eval_guidance_scale
            images = []
            for i, prompt in enumerate(self.prompts):
                generator = torch.Generator(device=models.device).manual_seed(config.eval_seed + i)
                with autocast() if autocast is not None else contextlib.nullcontext():
                    images.append(pipe(prompt, generator=generator, **kwargs).images[0])
        finally:
            denoiser.train(was_training)
        return images

    def score(self, images: list) -> dict[str, float]:
        """Mean score per reward (NaN scores left out; a failing reward gives NaN and a warning)."""
        from ..transforms.scoring import score_ensemble

        means = {}
        for name, scores in score_ensemble(self.rewards, images, self.prompts).items():
            if isinstance(scores, str):
                logger.warning("eval reward %s failed: %s", name, scores)
                means[name] = math.nan
                continue
            finite = [s for s in scores if math.isfinite(s)]
            means[name] = sum(finite) / len(finite) if finite else math.nan
        return means

    def run(self, step: int, denoiser: torch.nn.Module, autocast=None) -> dict[str, float]:
        """Generate, score, append ``step, reward, mean`` rows to the CSV; return {reward: mean}."""
        means = self.score(self.generate(denoiser, autocast))
        new_file = not self.log_path.is_file()
        with self.log_path.open("a", newline="") as f:
            writer = csv.DictWriter(f, EVAL_COLUMNS)
            if new_file:
                writer.writeheader()
            writer.writerows({"step": step, "reward": name, "mean": mean} for name, mean in means.items())
        self.history.append({"step": step, **means})
        logger.info("eval step %d: %s", step, ", ".join(f"{k} {v:.5g}" for k, v in means.items()))
        return means


def read_eval_log(path: str | Path) -> list[dict]:
    """``eval_log.csv`` rows as dicts (step int, mean float)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{"step": int(r["step"]), "reward": r["reward"], "mean": float(r["mean"])} for r in csv.DictReader(f)]


def rewrite_eval_log(path: str | Path, up_to_step: int) -> None:
    """Keep the rows up to a resumed step (an interrupted run may have evaluated past it)."""
    rows = [r for r in read_eval_log(path) if r["step"] <= up_to_step]
    if not Path(path).is_file():
        return
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, EVAL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

