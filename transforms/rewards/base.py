"""The reward interface and registry.

A reward scores images against their prompts. ``load()`` does the heavy work
(weights) and runs on workers only; constructing a reward is cheap so it can be
validated at pipeline build time and pickled to workers.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Hashable, Optional, Sequence

from PIL import Image

from ...core.registry import Registry

REWARDS = Registry("reward")

# preprocess_key()s whose recipe starts by shrinking the image to ``key[1]`` pixels (the short side for a
# centre crop, the long side for padding to a square), so a smaller decode changes their input little.
SHRINKING_KEYS = ("clip_center_crop", "clip_pad_square", "clip_expand2square")


def register_reward(name: str):
    """Class decorator: make a reward selectable by ``name`` in job configs (sets ``cls.name``)."""
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    return REWARDS.names()


def create_reward(name: str, params: dict[str, Any] | None = None) -> "Reward":
    return REWARDS.lookup(name)(**(params or {}))


def check_rewards(rewards, where: str = "config.rewards") -> None:
    """Every reward config names a registered reward that accepts its params (run before any work)."""
    for i, r in enumerate(rewards):
        cls = REWARDS.lookup(r.name, f"{where}.{i}.name")
        try:
            cls(**r.params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}.{i}.params: reward {r.name}: {' '.join(str(e).split())}") from None


class Reward(abc.ABC):
    """Scores a batch of images; higher is better. Only the order within one reward matters to Syn-Pic."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"

    def load(self) -> None:
        """Load weights. Called once per worker before the first ``score_batch``."""

    def score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Return one float per image (NaN allowed: the pipeline drops it with a reason).

        Rewards with a ``preprocess_key`` get this for free; others override it.
        """
        if self.preprocess_key() is None:
            raise NotImplementedError(f"reward {self.name} must implement score_batch or preprocess_key")
        return self.score_preprocessed(self.preprocess(images), prompts)

    # Shared preprocessing: rewards whose ``preprocess_key()`` is equal (and not None) are given one
    # ``preprocess(images)`` result between them, so an ensemble decodes, resizes and normalises each
    # image once (e.g. every CLIP-224 reward shares ``preprocess.clip_center_crop``).
    def preprocess_key(self) -> Optional[Hashable]:
        return None

    def preprocess(self, images: Sequence[Image.Image]) -> Any:
        raise NotImplementedError

    def score_preprocessed(self, pixels: Any, prompts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def decode_min_side(self) -> int:
        """The shorter side an image may be decoded down to (JPEG DCT scaling, ``input.jpeg_draft``) because
        this reward's preprocessing shrinks every image to about that size anyway; 0 (the default) = it reads
        pixels at full resolution. Derived from ``preprocess_key()`` for the shared recipes in
        ``SHRINKING_KEYS``; a reward with its own resizing overrides it."""
        key = self.preprocess_key()
        if isinstance(key, tuple) and len(key) > 1 and key[0] in SHRINKING_KEYS and isinstance(key[1], int):
            return key[1]
        return 0

    def files(self) -> dict[str, str]:
        """Every file or folder the reward loads (name -> location), hidden second downloads included:
        checked before a build starts, listed by ``synpref check-models``, fingerprinted in the manifest."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Name, version, params and a fingerprint of the files it loads: recorded in the manifest, and
        (name, version, fingerprint) in every sample's labels, so a dataset says which judges labelled it."""
        from ..model_io import json_digest, model_fingerprint

        files = {k: v for k, v in self.files().items() if v}
        info = {"name": self.name, "version": self.version, "params": self.params(),
                "files": {k: {"location": v, "fingerprint": model_fingerprint(v)} for k, v in sorted(files.items())}}
        info["fingerprint"] = json_digest(info)
        return info

    def params(self) -> dict[str, Any]:
        return {}
