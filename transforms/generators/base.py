"""The generator interface and registry: text-to-image models selected by config."""
from __future__ import annotations

import abc
from typing import Sequence

import numpy as np

from ...core.registry import Registry
from ...schemas.config import GeneratorConfig
from ...schemas.records import Lineage

GENERATORS = Registry("generator type")


def register_generator(type_name: str):
    """Class decorator: make a generator selectable as ``generators[].type: type_name``."""
    return GENERATORS.register(type_name, attribute=None)


def available_generators() -> list[str]:
    return GENERATORS.names()


def create_generator(config: GeneratorConfig) -> "Generator":
    return GENERATORS.lookup(config.type)(config)


class Generator(abc.ABC):
    """Turns (prompt, seed) pairs into images. ``load()`` runs on workers only."""

    def __init__(self, config: GeneratorConfig):
        self.config = config

    @abc.abstractmethod
    def load(self) -> None:
        ...

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        """One HxWx3 float array in [0, 1] per prompt; NaNs are passed through, not hidden."""

    @abc.abstractmethod
    def lineage(self, seed: int) -> Lineage:
        """What the last ``generate`` call did for ``seed``: every setting it passed, the size it generated at."""

    def check(self) -> None:
        """Refuse settings this generator cannot run, in one line (run at preflight, before any work)."""

    def files(self) -> dict[str, str]:
        """Every file, folder or hub id the generator loads (checked before a build starts)."""
        return {"model": self.config.model}
