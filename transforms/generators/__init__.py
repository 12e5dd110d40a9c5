"""Text-to-image generators behind one interface (``Generator``) and a registry keyed by ``type``.

Every module in this folder is imported, so a new generator is one new file with ``@register_generator``.
"""
from .base import GENERATORS, Generator, available_generators, create_generator, register_generator

GENERATORS.discover(__name__, __path__, skip={"base"})

__all__ = ["GENERATORS", "Generator", "available_generators", "create_generator", "register_generator"]
