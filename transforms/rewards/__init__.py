"""Reward models behind one interface (``Reward``) and a registry selected by config.

Importing this package registers the built-in rewards.
"""
from .base import REWARDS, Reward, available_rewards, create_reward, register_reward
from . import clip_score, jpeg_compressibility, sharpness  # noqa: F401  (registration)

__all__ = ["REWARDS", "Reward", "available_rewards", "create_reward", "register_reward"]
