"""Noisy-pair filtering on simulated rewards: how precise and complete are the kept pairs?

Each simulated prompt has k = 4 candidates with true qualities 0, 1, 2, 3 and five rewards, each the
true quality plus Gaussian noise (sd ``sigma``, seeded numpy). In the adversarial scenario reward r0
scores minus the true quality plus noise. Every candidate pair is truly ordered, so

* precision = share of kept pairs whose winner is truly better;
* recall    = share of all truly ordered pairs (6 per prompt) that are kept, correctly oriented.

Scenarios: ``sigma1.5`` (five honest rewards, sd 1.5) and ``sigma1.0+adv`` (sd 1.0, r0 adversarial).
The run goes through the real code: ``aggregators.dataset_stats`` (what the Beam combines compute),
``ranking.rank_candidates`` and ``filtering.keep_pair``. ``python -m pytest -s`` prints the table.

Documented setting (``TARGET``): ``ranking.aggregator: mean_zscore`` (dataset-wide z-scores) with
``filter.min_aggregate_gap: 0.08`` (and the default ``min_agreement_margin: 0``) reaches precision
>= 0.95 with recall >= 0.70 in both scenarios. Agreement-only filters cannot: with 5 rewards the
margin takes the values 0.1, 0.3, 0.5, and margin 0 is too loose while 0.2 (4 of 5) loses a third of
the pairs; with an adversarial reward no pair is unanimous.
"""
from __future__ import annotations

import numpy as np
import pytest

from synpref.schemas.config import FilterConfig
from synpref.schemas.records import Candidate, Lineage, PromptRecord
from synpref.transforms.aggregators import dataset_stats, get_aggregator
from synpref.transforms.filtering import keep_pair
from synpref.transforms.ranking import rank_candidates

REWARDS = [f"r{i}" for i in range(5)]
K = 4
GROUPS = 2000
SCENARIOS = {"sigma1.5": (1.5, False), "sigma1.0+adv": (1.0, True)}
_LINEAGE = Lineage("g", "m", "main", "P", "S", 2, 5.0, 64, 64, "float32", 0)

# (label, aggregator, ranking options, filter config; None = keep every pair the ranking emits)
SETTINGS = [
    ("syn_pic, no filter", "syn_pic", {}, None),
    ("syn_pic, margin 0", "syn_pic", {}, FilterConfig()),
    ("syn_pic, margin 0.2", "syn_pic", {}, FilterConfig(min_agreement_margin=0.2)),
    ("syn_pic, unanimous", "syn_pic", {}, FilterConfig(require_unanimous=True)),
    ("mean_bt, gap 0.08", "mean_bt", {}, FilterConfig(min_aggregate_gap=0.08)),
    ("mean_zscore, gap 0.08", "mean_zscore", {}, FilterConfig(min_aggregate_gap=0.08)),
    ("mean_zscore/prompt, gap 0.1", "mean_zscore", {"zscore_scope": "prompt"}, FilterConfig(min_aggregate_gap=0.1)),
    ("weighted_sum, gap 0.08", "weighted_sum", {}, FilterConfig(min_aggregate_gap=0.08)),
    ("reliability_weighted, margin 0", "reliability_weighted", {}, FilterConfig()),
    ("reliability_weighted, gap 0.16", "reliability_weighted", {}, FilterConfig(min_aggregate_gap=0.16)),
]
TARGET = "mean_zscore, gap 0.08"


def simulate_tables(groups: int, sigma: float, adversarial: bool, seed: int = 0) -> np.ndarray:
    """[groups, k, n] scores: candidate c has true quality c; reward r0 is adversarial if asked."""
    rng = np.random.default_rng(seed)
    quality = np.arange(K, dtype=np.float64)
    noise = rng.normal(0.0, sigma, size=(groups, K, len(REWARDS)))
    scores = quality[None, :, None] + noise
    if adversarial:
        scores[:, :, 0] = -quality[None, :] + noise[:, :, 0]
    return scores


def precision_recall(tables: np.ndarray, aggregator: str, options: dict, cfg) -> tuple[float, float, dict]:
    need = get_aggregator(aggregator).needs_stats(options)
    stats = dataset_stats(tables, REWARDS, need) if need else None
    kept = correct = 0
    for t in tables:
        cands = [Candidate(f"c{i}", "p", "x", _LINEAGE, "", "", dict(zip(REWARDS, t[i]))) for i in range(K)]
        group = rank_candidates(PromptRecord("p", "x"), cands, REWARDS, aggregator, stats=stats, **options)
        for pair in group.pairs:
            if cfg is None or keep_pair(pair, cfg) is True:
                kept += 1
                correct += int(pair.winner_id[1:]) > int(pair.loser_id[1:])
    return correct / max(kept, 1), correct / (len(tables) * K * (K - 1) // 2), stats or {}


def simulation_rows(groups: int = GROUPS, seed: int = 0) -> list[dict]:
    """One row per setting: {"setting", "<scenario>": (precision, recall), ...}."""
    tables = {name: simulate_tables(groups, sigma, adv, seed) for name, (sigma, adv) in SCENARIOS.items()}
    rows = []
    for label, aggregator, options, cfg in SETTINGS:
        row = {"setting": label}
        for name, t in tables.items():
            p, r, _ = precision_recall(t, aggregator, options, cfg)
            row[name] = (p, r)
        rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'setting':34s}" + "".join(f"{name + ' P/R':>22s}" for name in SCENARIOS)]
    for row in rows:
        lines.append(f"{row['setting']:34s}" + "".join(f"{row[n][0]:>15.3f}/{row[n][1]:.3f}" for n in SCENARIOS))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def rows():
    table = simulation_rows()
    print("\n" + format_rows(table))
    return {row["setting"]: row for row in table}


def test_agreement_filters_reproduce_the_reference_trade_off(rows):
    p, r = rows["syn_pic, no filter"]["sigma1.5"]
    assert p == r and 0.85 <= p <= 0.93  # every pair kept: precision equals recall
    p, r = rows["syn_pic, margin 0"]["sigma1.5"]
    assert 0.90 <= p <= 0.94 and 0.83 <= r <= 0.90
    p, r = rows["syn_pic, margin 0.2"]["sigma1.5"]
    assert 0.95 <= p <= 0.99 and 0.62 <= r <= 0.72
    # One adversarial reward: no pair is unanimous among all five.
    assert rows["syn_pic, unanimous"]["sigma1.0+adv"][1] < 0.1


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_documented_setting_reaches_precision_95_and_recall_70(rows, scenario):
    p, r = rows[TARGET][scenario]
    assert p >= 0.95 and r >= 0.70, (scenario, p, r)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_agreement_only_filters_miss_the_target(rows, scenario):
    """The target is not trivially met: the paper-style margin filter fails it in both scenarios."""
    for setting in ("syn_pic, margin 0", "syn_pic, margin 0.2"):
        p, r = rows[setting][scenario]
        assert not (p >= 0.95 and r >= 0.70), (setting, scenario, p, r)


def test_the_target_filter_is_what_earns_the_precision():
    """Same aggregator without the gap rule: precision falls below the target (a broken filter fails)."""
    t = simulate_tables(GROUPS, 1.5, False)
    p, r, _ = precision_recall(t, "mean_zscore", {}, FilterConfig())
    assert p < 0.95 and r > 0.8


def test_reliability_weighting_silences_the_adversarial_reward():
    t = simulate_tables(GROUPS, 1.0, True)
    stats = dataset_stats(t, REWARDS, "reliability")
    assert stats["weight"]["r0"] == 0.0 and stats["agree"]["r0"] < 0.2
    assert all(stats["weight"][r] > 0.5 for r in REWARDS[1:])
    assert not stats["fallback_equal_weights"]
