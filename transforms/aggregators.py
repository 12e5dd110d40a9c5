"""Aggregators turn a (k candidates x n rewards) score table into one label per candidate (higher = better).

``syn_pic`` is the paper's Algorithm 1 (arXiv 2410.18013 Alg. 1; docs/math.md s.1) and the default. The others are options under
their own names (docs/math.md s.1); none of them is "Syn-Pic". Every aggregator returns, per candidate,
its raw aggregate ``a`` and its label ``phi`` in [0, 1] (phi ranks the candidates and feeds RankDPO's gain).

Notation: ``r[i, l]`` is reward l's score of candidate i, ``w_l`` the reward weights (config
``ranking.reward_weights``, default 1 each), ``sigma`` the logistic function.

* ``syn_pic``: phi_i = sum_l w_l #{j != i: r[i,l] > r[j,l]} / (sum_l w_l (k - 1)); a_i = phi_i.
  With equal weights this is C_i / (n (k - 1)), the paper's win rate (ties count for nobody).
* ``mean_bt``: P_ij = sum_l w_l sigma((r[i,l] - r[j,l]) / s_l) / sum_l w_l, with s_l reward l's
  standard deviation over the whole dataset (every scored candidate; population sd). Each candidate's
  label is its mean Bradley-Terry win probability against the other candidates of its prompt:
  a_i = phi_i = mean_{j != i} P_ij.
* ``mean_zscore``: z[i,l] = (r[i,l] - mu_l) / s_l, with mu_l, s_l over the whole dataset
  (``zscore_scope: dataset``) or over the prompt's own candidates (``zscore_scope: prompt``);
  a_i = sum_l w_l z[i,l] / sum_l w_l; phi_i = mean_{j != i} sigma(a_i - a_j).
* ``weighted_sum``: a_i = sum_l w_l r[i,l] (raw scales: the user's responsibility); phi as mean_zscore.
* ``reliability_weighted``: Syn-Pic with weights estimated from the data (``reliability_weights``):
  agree_l = over every prompt and every pair (i, j) of its candidates where the *other* rewards
  (leave-one-out) are not tied -- more of them prefer one image strictly than the other -- the share
  where reward l strictly prefers that same image (a tie of reward l counts as disagreement);
  w_l = max(0, 2 agree_l - 1): 0 for a reward no better than chance, and for an adversarial one.
  A reward with no such pair gets agree_l = 0.5, w_l = 0. If every w_l is 0, equal weights are used
  and the statistics say so (``fallback_equal_weights``). ``ranking.reward_weights`` is not used.

A standard deviation of 0 (a constant reward) is replaced by 1, so that reward contributes nothing
to differences instead of dividing by zero.

Statistics over the whole dataset (``needs``: "moments" or "reliability") are computed by a Beam
combine in ``transforms.ranking`` and handed to the aggregator as a plain dict (``stats``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from ..core.registry import Registry

# fn(scores [k, n], weights [n], stats dict, options dict) -> (a [k], phi [k])
AggregatorFn = Callable[[np.ndarray, np.ndarray, Mapping, Mapping], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Aggregator:
    name: str
    fn: AggregatorFn
    needs: Optional[str] = None  # None, "moments" (dataset mean/sd per reward) or "reliability"
    uses_config_weights: bool = True

    def needs_stats(self, options: Mapping | None = None) -> Optional[str]:
        """Which dataset-wide statistics this aggregator needs with these options (None: none)."""
        if self.name == "mean_zscore" and (options or {}).get("zscore_scope", "dataset") == "prompt":
            return None
        return self.needs


AGGREGATORS = Registry("aggregator")


def register_aggregator(name: str, needs: Optional[str] = None, uses_config_weights: bool = True):
    """Function decorator: make a labelling function selectable as ``ranking.aggregator: name``."""

    def wrap(fn):
        AGGREGATORS.add(name, Aggregator(name, fn, needs, uses_config_weights))
        return fn

    return wrap


def available_aggregators() -> list[str]:
    return AGGREGATORS.names()


def get_aggregator(name: str) -> Aggregator:
    return AGGREGATORS.lookup(name)


def strict_wins(scores: np.ndarray) -> np.ndarray:
    """W[i, j] = number of rewards scoring image i strictly above image j (ties count for nobody)."""
    s = np.asarray(scores, dtype=np.float64)
    return (s[:, None, :] > s[None, :, :]).sum(axis=2)


def strict_prefers(scores: np.ndarray) -> np.ndarray:
    """B[i, j, l] = True where reward l scores image i strictly above image j."""
    s = np.asarray(scores, dtype=np.float64)
    return s[:, None, :] > s[None, :, :]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # numerically stable logistic


def _mean_over_others(m: np.ndarray) -> np.ndarray:
    """Row means of a k x k matrix over j != i."""
    k = m.shape[0]
    return (m.sum(axis=1) - np.diag(m)) / (k - 1)


def _check(scores: np.ndarray, weights: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    k, n = scores.shape
    if k < 2:
        raise ValueError("an aggregator needs at least two candidates")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"reward weights must be {n} non-negative numbers, not all zero; got {w}")
    return scores, w


def _sd(stats: Mapping, reward_names: Sequence[str]) -> np.ndarray:
    sd = np.array([float(stats["sd"][r]) for r in reward_names])
    return np.where(sd > 0, sd, 1.0)


def weighted_win_rate(scores: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """phi_i = sum_l w_l #{j != i: r[i,l] > r[j,l]} / (sum_l w_l (k - 1))."""
    scores, w = _check(scores, weights)
    k = scores.shape[0]
    return (strict_prefers(scores) * w).sum(axis=(1, 2)) / (w.sum() * (k - 1))


def syn_pic_win_rate(scores: np.ndarray) -> np.ndarray:
    """phi_i = C_i / (n (k - 1)): the fraction of (reward, other image) comparisons image i wins strictly."""
    scores = np.asarray(scores, dtype=np.float64)
    k, n = scores.shape
    if k < 2:
        raise ValueError("Syn-Pic needs at least two candidates")
    return strict_wins(scores).sum(axis=1) / float(n * (k - 1))


@register_aggregator("syn_pic")
def _syn_pic(scores, weights, stats, options):
    scores, w = _check(scores, weights)
    phi = syn_pic_win_rate(scores) if np.all(w == w[0]) else weighted_win_rate(scores, w)
    return phi, phi


@register_aggregator("mean_bt", needs="moments")
def mean_bt(scores, weights, stats, options):
    scores, w = _check(scores, weights)
    sd = _sd(stats, options["reward_names"])
    p = (_sigmoid((scores[:, None, :] - scores[None, :, :]) / sd) * w).sum(axis=2) / w.sum()
    phi = _mean_over_others(p)
    return phi, phi


def _phi_from_aggregate(a: np.ndarray) -> np.ndarray:
    return _mean_over_others(_sigmoid(a[:, None] - a[None, :]))


@register_aggregator("mean_zscore", needs="moments")
def mean_zscore(scores, weights, stats, options):
    scores, w = _check(scores, weights)
    if options.get("zscore_scope", "dataset") == "prompt":
        mu, sd = scores.mean(axis=0), scores.std(axis=0)
        sd = np.where(sd > 0, sd, 1.0)
    else:
        names = options["reward_names"]
        mu, sd = np.array([float(stats["mean"][r]) for r in names]), _sd(stats, names)
    a = ((scores - mu) / sd * w).sum(axis=1) / w.sum()
    return a, _phi_from_aggregate(a)


@register_aggregator("weighted_sum")
def weighted_sum(scores, weights, stats, options):
    scores, w = _check(scores, weights)
    a = (scores * w).sum(axis=1)
    return a, _phi_from_aggregate(a)


@register_aggregator("reliability_weighted", needs="reliability", uses_config_weights=False)
def reliability_weighted(scores, weights, stats, options):
    # ``weights`` are the estimated reliabilities (ranking.weights_for puts them there).
    phi = weighted_win_rate(scores, weights)
    return phi, phi


# ---- dataset-wide statistics: pure accumulators (the Beam CombineFns in ranking.py wrap these)

def moments_add(acc: dict, scores: Mapping[str, float]) -> dict:
    """Welford update of {reward: [count, mean, M2]} with one candidate's scores."""
    for r, x in scores.items():
        n, mean, m2 = acc.get(r, (0, 0.0, 0.0))
        n += 1
        d = float(x) - mean
        mean += d / n
        acc[r] = (n, mean, m2 + d * (float(x) - mean))
    return acc


def moments_merge(accs) -> dict:
    """Chan et al.'s parallel merge of Welford accumulators."""
    out: dict = {}
    for acc in accs:
        for r, (nb, mb, m2b) in acc.items():
            na, ma, m2a = out.get(r, (0, 0.0, 0.0))
            n = na + nb
            if n == 0:
                continue
            d = mb - ma
            out[r] = (n, ma + d * nb / n, m2a + m2b + d * d * na * nb / n)
    return out


def moments_extract(acc: dict) -> dict:
    """{"count": {r: n}, "mean": {r: mu}, "sd": {r: population sd}} (sd of a single value: 0)."""
    return {"count": {r: int(n) for r, (n, _, _) in sorted(acc.items())},
            "mean": {r: float(m) for r, (_, m, _) in sorted(acc.items())},
            "sd": {r: float(np.sqrt(m2 / n)) if n else 0.0 for r, (n, _, m2) in sorted(acc.items())}}


def reliability_counts(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For one prompt's table: (agree[n], total[n]) integer counts of the leave-one-out rule above."""
    prefers = strict_prefers(scores)  # [k, k, n]
    k, _, n = prefers.shape
    iu, ju = np.triu_indices(k, 1)
    fwd, back = prefers[iu, ju, :].astype(np.int64), prefers[ju, iu, :].astype(np.int64)  # [pairs, n]
    others_fwd = fwd.sum(axis=1, keepdims=True) - fwd
    others_back = back.sum(axis=1, keepdims=True) - back
    decided = others_fwd != others_back
    agree = decided & (((others_fwd > others_back) & (fwd == 1)) | ((others_back > others_fwd) & (back == 1)))
    return agree.sum(axis=0), decided.sum(axis=0)


def reliability_from_counts(agree: Mapping[str, int], total: Mapping[str, int],
                            reward_names: Sequence[str]) -> dict:
    """{"agree": {r: agree_r}, "weight": {r: w_r}, "pairs": {r: total}, "fallback_equal_weights": bool}."""
    rates = {r: (agree.get(r, 0) / total[r]) if total.get(r, 0) else 0.5 for r in reward_names}
    weights = {r: max(0.0, 2.0 * rates[r] - 1.0) for r in reward_names}
    fallback = all(w == 0.0 for w in weights.values())
    if fallback:
        weights = {r: 1.0 for r in reward_names}
    return {"agree": rates, "weight": weights, "pairs": {r: int(total.get(r, 0)) for r in reward_names},
            "fallback_equal_weights": fallback}


def dataset_stats(tables: Sequence[np.ndarray], reward_names: Sequence[str], needs: Optional[str]) -> dict:
    """The statistics the Beam combines compute, from in-memory tables (tests, simulations)."""
    if needs == "moments":
        acc: dict = {}
        for t in tables:
            for row in np.asarray(t, dtype=np.float64):
                moments_add(acc, dict(zip(reward_names, row)))
        return moments_extract(acc)
    if needs == "reliability":
        agree, total = np.zeros(len(reward_names), np.int64), np.zeros(len(reward_names), np.int64)
        for t in tables:
            a, n = reliability_counts(np.asarray(t, dtype=np.float64))
            agree += a
            total += n
        return reliability_from_counts(dict(zip(reward_names, agree.tolist())),
                                       dict(zip(reward_names, total.tolist())), reward_names)
    return {}
