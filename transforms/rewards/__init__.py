"""Reward models behind one interface (``Reward``) and a registry selected by config.

Importing this package registers the built-in rewards: every module in this folder is imported, so a new
reward is one new file with ``@register_reward``.
"""

from .base import REWARDS, Reward, available_rewards, check_rewards, create_reward, register_reward

REWARDS.discover(__name__, __path__, skip={"base", "preprocess"})

__all__ = ["REWARDS", "Reward", "available_rewards", "check_rewards", "create_reward", "register_reward"]
