"""Model families for the trainer: one file each, chosen from ``model_index.json`` (see ``base.py``)."""
from .base import (
    FAMILIES,
    ModelFamily,
    available_families,
    family_for,
    pipeline_class_name,
    register_family,
)

__all__ = ["FAMILIES", "ModelFamily", "available_families", "family_for", "pipeline_class_name", "register_family"]
