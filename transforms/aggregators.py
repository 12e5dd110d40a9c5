"""Aggregators turn a (k candidates x n rewards) score table into one label per candidate (higher = better).

``syn_pic`` is the paper's Algorithm 1 (PAPER_NOTES s.1) and the default. Other
aggregators slot in here under their own names; none of them is "Syn-Pic".
"""
from __future__ import annotations

from typing import Callable

import numpy as np

AGGREGATORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


def register_aggregator(name: str):
    def wrap(fn):
        AGGREGATORS[name] = fn
        return fn

    return wrap


def get_aggregator(name: str) -> Callable[[np.ndarray], np.ndarray]:
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; available: {sorted(AGGREGATORS)}")
    return AGGREGATORS[name]


def strict_wins(scores: np.ndarray) -> np.ndarray:
    """W[i, j] = number of rewards scoring image i strictly above image j (ties count for nobody)."""
    s = np.asarray(scores, dtype=np.float64)
    return (s[:, None, :] > s[None, :, :]).sum(axis=2)


@register_aggregator("syn_pic")
def syn_pic_win_rate(scores: np.ndarray) -> np.ndarray:
    """phi_i = C_i / (n (k - 1)): the fraction of (reward, other image) comparisons image i wins strictly."""
    k, n = scores.shape
    if k < 2:
        raise ValueError("Syn-Pic needs at least two candidates")
    return strict_wins(scores).sum(axis=1) / float(n * (k - 1))
