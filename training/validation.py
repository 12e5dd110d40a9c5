"""Held-out preference accuracy during training: is the model learning the preferences, or the training set?

Training-set accuracy alone cannot show overfitting (Diffusion-DPO users ask for exactly this). With
``validation_shards`` or ``validation_fraction`` (``training/config.py``), ``Validator.run`` computes, every
``validation_every`` optimiser steps and after the last one, the training loss and the implicit preference
accuracy (share of pairs the model prefers more than the reference does; diffusers' ``implicit_acc``) on
the held-out prompts, pooled over all their pairs.

Each prompt is evaluated alone with a generator seeded from (``seed``, prompt id): the same VAE sample,
timestep and noise at every evaluation, whatever the order or the number of processes, so two evaluations
of the same weights give the same figures and a change between evaluations is the model's. Validation
draws nothing from the training generator or the global RNG and computes no gradients: a run trains the
same with it on or off (tested).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging

import torch

from .caching import EncoderCache
from .data import TrainInputError, collate_ranked, open_validation
from .losses import preference_pairs

logger = logging.getLogger("synpref.training")

VALIDATION_COLUMNS = ["val_loss", "val_implicit_acc"]  # appended to train_log.csv's columns when validating


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The seed of one validation prompt's generator: fixed per (run seed, prompt), independent of order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:validation:{prompt_id}".encode()).digest()[:8], "big") >> 1


def pair_mode(config) -> str:
    """Which pairs the accuracy counts: those the loss trains on (every pair for rankdpo)."""
    return "all" if config.loss == "rankdpo" else config.dpo_pairs


class Validator:
    """Evaluates the held-out prompts; keeps the figures of this run (restored on resume).

    Args:
        config: the ``TrainConfig`` (``validation_*`` fields).
        models: the trainer's loaded ``ModelFamily``.

    Raises:
        TrainInputError: the validation data holds no prompt with a usable pair (one line).
    """

    def __init__(self, config, models):
        self.config = config
        self.models = models
        self.reader = open_validation(config)
        self.cache = EncoderCache(models, latents=config.cache_latents, text=config.cache_text_embeddings)
        self.history: list[dict] = []  # {"step", "loss", "implicit_acc"} per evaluation
        self.prompts, self.pairs = self._count()

    @property
    def source(self) -> str:
        return "validation_shards" if self.config.validation_shards else "validation_fraction"

    def _count(self) -> tuple[int, int]:
        """Prompts and pairs in the validation data (one read, before training starts)."""
        prompts = pairs = 0
        for item in self.reader:
            n = len(preference_pairs(item.phi, item.rank, torch.zeros(len(item.phi), dtype=torch.long),
                                     pair_mode(self.config), item.pair_mask)[0])
            prompts, pairs = prompts + (n > 0), pairs + n
        if not pairs:
            where = (f"validation_shards {self.config.validation_shards}" if self.config.validation_shards
                     else f"the validation_fraction {self.config.validation_fraction} of shards")
            raise TrainInputError(f"{where} hold no prompt with a usable pair (skipped: {dict(self.reader.skipped)}); "
                             "give more validation data or a larger validation_fraction")
        return prompts, pairs

    def due(self, step: int) -> bool:
        """Validate after this optimiser step: every ``validation_every`` steps and after the last."""
        every = self.config.validation_every
        return bool(every) and (step % every == 0 or step == self.config.max_steps)

    @torch.no_grad()
    def run(self, step: int, autocast=None) -> dict:
        """Loss (mean over prompts) and implicit accuracy (over all pairs) of ``models.denoiser`` (unwrapped).

        Returns and records ``{"step", "loss", "implicit_acc"}``.
        """
        from .train import compute_step

        config, models = self.config, self.models
        denoiser = models.denoiser
        was_training = denoiser.training
        denoiser.eval()
        loss_sum, prompts, correct, pairs = 0.0, 0, 0, 0
        try:
            for item in self.reader:
                batch = collate_ranked([item])
                n = len(preference_pairs(batch.phi, batch.rank, batch.group, pair_mode(config), batch.pair_mask)[0])
                if not n:
                    continue
                generator = torch.Generator().manual_seed(prompt_seed(config.seed, item.prompt_id))
                with autocast() if autocast is not None else contextlib.nullcontext():
                    out = compute_step(models, batch, config, generator, self.cache)
                loss_sum += float(out.loss)
                correct += round(float(out.stats[0]) * n)  # the share of n pairs, back to a count
                prompts, pairs = prompts + 1, pairs + n
        finally:
            denoiser.train(was_training)
        figures = {"step": step, "loss": loss_sum / prompts, "implicit_acc": correct / pairs}
        self.history.append(figures)
        logger.info("validation step %d: loss %.5f implicit_acc %.4f (%d prompts, %d pairs)", step,
                    figures["loss"], figures["implicit_acc"], prompts, pairs)
        return figures

    def summary(self) -> dict:
        """What ``train_summary.json`` records under ``validation``."""
        return {"source": self.source, "prompts": self.prompts, "pairs": self.pairs,
                "every": self.config.validation_every,
                "steps": [h["step"] for h in self.history], "loss": [h["loss"] for h in self.history],
                "implicit_acc": [h["implicit_acc"] for h in self.history],
                "last": self.history[-1] if self.history else None}
