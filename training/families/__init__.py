"""Model families for the trainer: one file each, chosen from ``model_index.json`` (see ``base.py``).

Every module in this folder is imported, so a new family is one new file with ``@register_family``.
"""
from .base import (
    FAMILIES,
    ModelFamily,
    available_families,
    family_for,
    pipeline_class_name,
    register_family,
)

FAMILIES.discover(__name__, __path__, skip={"base"})

__all__ = ["FAMILIES", "ModelFamily", "available_families", "family_for", "pipeline_class_name", "register_family"]
