"""Paired statistics for ``synpref evaluate``: each model against the baseline on the same (prompt, seed).

Every model renders the same prompts with the same seeds, so the comparison is paired: one pair is the
model's image and the baseline's image of one (prompt, seed), and one judge (or the Syn-Pic label) scores
both. Definitions (docs/evaluate_report.md, "Reading the report"):

* a pair is a **win** when the model's score is strictly higher, a **loss** when strictly lower, a **tie**
  when exactly equal; ties are counted apart. Win rate = wins / pairs; the "ties as half" rate is
  (wins + ties / 2) / pairs.
* **sign test**: exact two-sided binomial test of wins against losses (ties dropped) under p = 1/2.
* **bootstrap over prompts**: the seeds of one prompt are not independent draws (same text, correlated
  images), so the interval resamples *prompts* with replacement, each drawn prompt bringing all its pairs.
  Prompts are ordered by sorted prompt id; resample b draws prompt indices
  ``np.random.default_rng(seed).integers(0, P, size=(n_boot, P))[b]`` (a fresh generator for every
  figure, so one figure can be recomputed alone). The interval is the percentile interval
  (``np.quantile``, linear) of the statistic over the resamples.
* **Syn-Pic phi** of an image among the k models' images of one (prompt, seed) under n judges: the share
  of (judge, other image) comparisons it wins strictly, phi = #wins / (n (k - 1)) -- the ``syn_pic``
  label of docs/math.md s.1 (arXiv 2410.18013, Algorithm 1), with the models' images as the candidates.

Every statistic here is a ratio of per-prompt sums (wins / pairs, summed differences / pairs, summed phi /
images), so one bootstrap routine serves them all. Pure numpy + math: no scipy at run time.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
_CHUNK = 256  # bootstrap resamples handled at once (bounds the [chunk, prompts, statistics] gather in memory)


def sign_test_p(wins: int, losses: int) -> Optional[float]:
    """Exact two-sided sign test: P(a split at least as uneven as wins:losses | p = 1/2); None with no untied pair.

    The binomial with p = 1/2 is symmetric, so the two-sided p-value is twice the smaller tail, capped at 1
    (the same as the "minlike" rule of ``scipy.stats.binomtest``). Exact integer arithmetic until the end.
    """
    n = wins + losses
    if n == 0:
        return None
    tail, term = 0, 1  # term = C(n, i), updated exactly: C(n, i + 1) = C(n, i) (n - i) / (i + 1)
    for i in range(min(wins, losses) + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / 2 ** n)  # int / int: correctly rounded even when 2 ** n exceeds a float


def bootstrap_indices(n_prompts: int, n_boot: int, seed: int) -> np.ndarray:
    """The resampled prompt indices, [n_boot, n_prompts]; row b is bootstrap sample b."""
    return np.random.default_rng(seed).integers(0, n_prompts, size=(n_boot, n_prompts))


def per_prompt_sums(prompt_ids: Sequence[str], values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by prompt (sorted prompt ids): (prompts [P], column sums [P, m], row counts [P])."""
    prompts, inverse = np.unique(np.asarray(prompt_ids, dtype=str), return_inverse=True)
    values = np.asarray(values, dtype=np.float64).reshape(len(inverse), -1)
    sums = np.zeros((len(prompts), values.shape[1]))
    np.add.at(sums, inverse, values)
    return prompts, sums, np.bincount(inverse, minlength=len(prompts)).astype(np.float64)


def bootstrap_ratio_intervals(sums: np.ndarray, counts: np.ndarray, *, seed: int, n_boot: int,
                              confidence: float = CONFIDENCE) -> np.ndarray:
    """Percentile intervals [m, 2] of ratio_c = sum(sums[:, c]) / sum(counts) under the bootstrap over prompts.

    Resample b's statistic is the sum of its drawn prompts' sums over the sum of their counts: the statistic
    of the concatenated pairs of the drawn prompts. numpy's own summation (no BLAS) keeps the rounding, hence
    the output bytes, independent of thread count.
    """
    idx = bootstrap_indices(len(counts), n_boot, seed)
    stats = np.empty((n_boot, sums.shape[1]))
    for start in range(0, n_boot, _CHUNK):
        rows = idx[start:start + _CHUNK]  # [chunk, P] prompt indices
        stats[start:start + len(rows)] = sums[rows].sum(axis=1) / counts[rows].sum(axis=1)[:, None]
    alpha = (1.0 - confidence) / 2
    return np.quantile(stats, [alpha, 1.0 - alpha], axis=0).T


def _interval(pair) -> list[float]:
    return [float(pair[0]), float(pair[1])]


def paired_comparison(prompt_ids: Sequence[str], model_scores: np.ndarray, base_scores: np.ndarray, *,
                      seed: int, n_boot: int, confidence: float = CONFIDENCE) -> dict:
    """Paired figures of one comparison: one entry per (prompt, seed) pair, scores finite on both sides.

    Returns a strict-JSON-able dict: ``n_pairs``, ``n_prompts``, ``wins``, ``losses``, ``ties``, ``win_rate``,
    ``loss_rate``, ``tie_rate``, ``win_rate_ties_half``, ``p_value`` (sign test), ``mean_diff`` (model -
    baseline) and the intervals ``win_rate_ci``, ``win_rate_ties_half_ci``, ``mean_diff_ci`` ([lo, hi]).
    With no pair every rate, interval and p-value is None.
    """
    model_scores = np.asarray(model_scores, dtype=np.float64)
    base_scores = np.asarray(base_scores, dtype=np.float64)
    if model_scores.shape != base_scores.shape or model_scores.shape != (len(prompt_ids),):
        raise ValueError("prompt_ids, model_scores and base_scores must be aligned 1-d sequences")
    if not (np.isfinite(model_scores).all() and np.isfinite(base_scores).all()):
        raise ValueError("paired scores must be finite (leave out a pair with a missing score before)")
    diff = model_scores - base_scores
    win, loss = diff > 0, diff < 0
    n = len(diff)
    out = {"n_pairs": n, "n_prompts": len(set(prompt_ids)), "wins": int(win.sum()), "losses": int(loss.sum()),
           "ties": int(n - win.sum() - loss.sum())}
    out["p_value"] = sign_test_p(out["wins"], out["losses"])
    if n == 0:
        return {**out, **{k: None for k in ("win_rate", "loss_rate", "tie_rate", "win_rate_ties_half", "mean_diff",
                                            "win_rate_ci", "win_rate_ties_half_ci", "mean_diff_ci")}}
    tie = ~(win | loss)
    columns = np.stack([win, win + 0.5 * tie, diff], axis=1).astype(np.float64)
    _, sums, counts = per_prompt_sums(prompt_ids, columns)
    ci = bootstrap_ratio_intervals(sums, counts, seed=seed, n_boot=n_boot, confidence=confidence)
    out.update(win_rate=out["wins"] / n, loss_rate=out["losses"] / n, tie_rate=out["ties"] / n,
               win_rate_ties_half=(out["wins"] + 0.5 * out["ties"]) / n, mean_diff=float(diff.mean()),
               win_rate_ci=_interval(ci[0]), win_rate_ties_half_ci=_interval(ci[1]), mean_diff_ci=_interval(ci[2]))
    return out


def mean_with_interval(prompt_ids: Sequence[str], values: np.ndarray, *, seed: int, n_boot: int,
                       confidence: float = CONFIDENCE) -> dict:
    """Mean of ``values`` (one per row) with its bootstrap-over-prompts interval: {n, mean, mean_ci}."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"n": 0, "mean": None, "mean_ci": None}
    _, sums, counts = per_prompt_sums(prompt_ids, values[:, None])
    ci = bootstrap_ratio_intervals(sums, counts, seed=seed, n_boot=n_boot, confidence=confidence)
    return {"n": len(values), "mean": float(values.mean()), "mean_ci": _interval(ci[0])}


def syn_pic_phi(scores: np.ndarray) -> np.ndarray:
    """Syn-Pic phi of every image: scores [groups, k images, n judges] -> phi [groups, k].

    phi_i = #{(l, j): j != i, r_i^l > r_j^l} / (n (k - 1)); a tie earns nobody anything.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3 or s.shape[1] < 2 or s.shape[2] < 1:
        raise ValueError(f"Syn-Pic needs scores [groups, k >= 2 images, n >= 1 judges], got shape {s.shape}")
    k, n = s.shape[1], s.shape[2]
    wins = (s[:, :, None, :] > s[:, None, :, :]).sum(axis=(2, 3))  # [groups, i]: over j and judges
    return wins / float(n * (k - 1))
