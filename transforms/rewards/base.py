"""The reward interface and registry.

A reward scores images against their prompts. ``load()`` does the heavy work
(weights) and runs on workers only; constructing a reward is cheap so it can be
validated at pipeline build time and pickled to workers.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Sequence

from PIL import Image

REWARDS: dict[str, type["Reward"]] = {}


def register_reward(name: str):
    """Class decorator: make a reward selectable by ``name`` in job configs."""

    def wrap(cls):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} registered twice")
        cls.name = name
        REWARDS[name] = cls
        return cls

    return wrap


def available_rewards() -> list[str]:
    return sorted(REWARDS)


def create_reward(name: str, params: dict[str, Any] | None = None) -> "Reward":
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {available_rewards()}")
    return REWARDS[name](**(params or {}))


class Reward(abc.ABC):
    """Scores a batch of images; higher is better. Only the order within one reward matters to Syn-Pic."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"

    def load(self) -> None:
        """Load weights. Called once per worker before the first ``score_batch``."""

    @abc.abstractmethod
    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Return one float per image (NaN allowed: the pipeline drops it with a reason)."""

    def describe(self) -> dict[str, Any]:
        """Name, version and params, recorded in the manifest."""
        return {"name": self.name, "version": self.version, "params": self.params()}

    def params(self) -> dict[str, Any]:
        return {}
