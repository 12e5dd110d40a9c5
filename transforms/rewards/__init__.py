"""Reward models behind one interface (``Reward``) and a registry selected by config.

Importing this package registers the built-in rewards: every module in this folder
is imported, so a new reward is one new file with ``@register_reward``.
"""
import importlib
import pkgutil

from .base import REWARDS, Reward, available_rewards, check_rewards, create_reward, register_reward

_NOT_REWARDS = {"base", "preprocess"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _NOT_REWARDS and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REWARDS", "Reward", "available_rewards", "check_rewards", "create_reward", "register_reward"]
