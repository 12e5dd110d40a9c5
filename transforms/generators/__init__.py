"""Text-to-image generators behind one interface (``Generator``) and a registry keyed by ``type``."""
from .base import GENERATORS, Generator, available_generators, create_generator, register_generator
from . import diffusers_t2i  # noqa: F401  (registration)
from . import procedural  # noqa: F401  (registration)

__all__ = ["GENERATORS", "Generator", "available_generators", "create_generator", "register_generator"]
