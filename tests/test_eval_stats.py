"""Paired statistics of ``synpref evaluate`` (synpref.reporting.eval_stats), each against an independent computation."""
import math

import numpy as np
import pytest

from synpref.reporting.eval_stats import (bootstrap_indices, mean_with_interval, paired_comparison, sign_test_p,
                                          syn_pic_phi)
from synpref.transforms.aggregators import get_aggregator


def test_wins_losses_ties_of_a_hand_enumerated_case():
    # (prompt, model score, baseline score): 3 wins (a/0, b/0, b/1), 1 loss (a/1), 1 tie (c/0)
    prompts = ["a", "a", "b", "b", "c"]
    model = [2.0, 1.0, 0.5, 3.0, 7.0]
    base = [1.0, 1.5, 0.25, 2.0, 7.0]
    r = paired_comparison(prompts, model, base, seed=0, n_boot=200)
    assert (r["n_pairs"], r["n_prompts"], r["wins"], r["losses"], r["ties"]) == (5, 3, 3, 1, 1)
    assert r["win_rate"] == 3 / 5 and r["loss_rate"] == 1 / 5 and r["tie_rate"] == 1 / 5
    assert r["win_rate_ties_half"] == 3.5 / 5
    assert r["mean_diff"] == pytest.approx((1.0 - 0.5 + 0.25 + 1.0 + 0.0) / 5)
    assert r["p_value"] == 2 * (math.comb(4, 0) + math.comb(4, 1)) / 2 ** 4 == 0.625  # 4 untied, smaller side 1


def test_sign_test_by_hand_and_against_scipy():
    assert sign_test_p(8, 1) == 2 * (math.comb(9, 0) + math.comb(9, 1)) / 2 ** 9 == 0.0390625
    assert sign_test_p(1, 8) == sign_test_p(8, 1)
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(3, 0) == 0.25 and sign_test_p(1, 0) == 1.0
    assert sign_test_p(0, 0) is None  # no untied pair: no test
    assert sign_test_p(2000, 1000) < 1e-70  # large n: exact integer arithmetic, no overflow
    stats = pytest.importorskip("scipy.stats")
    for w in range(0, 25):
        for lose in (0, 1, 3, 7, 12, 24):
            if w + lose:
                assert sign_test_p(w, lose) == pytest.approx(stats.binomtest(w, w + lose, 0.5).pvalue, rel=1e-12)
    for w, lose in ((1500, 1450), (2100, 1900), (520, 480)):
        assert sign_test_p(w, lose) == pytest.approx(stats.binomtest(w, w + lose, 0.5).pvalue, rel=1e-9)


def _loop_bootstrap(prompts, model, base, seed, n_boot):
    """Straightforward re-implementation: draw prompts, concatenate their pairs, recompute the figures."""
    order = sorted(set(prompts))
    by_prompt = {p: [i for i, q in enumerate(prompts) if q == p] for p in order}
    idx = np.random.default_rng(seed).integers(0, len(order), size=(n_boot, len(order)))
    wr, half, diff = [], [], []
    for row in idx:
        rows = [i for k in row for i in by_prompt[order[k]]]
        d = [model[i] - base[i] for i in rows]
        wins, ties = sum(x > 0 for x in d), sum(x == 0 for x in d)
        wr.append(wins / len(d))
        half.append((wins + ties / 2) / len(d))
        diff.append(sum(d) / len(d))
    q = lambda v: [float(x) for x in np.quantile(v, [0.025, 0.975])]  # noqa: E731
    return q(wr), q(half), q(diff)


def test_bootstrap_over_prompts_matches_a_plain_loop():
    rng = np.random.default_rng(5)
    prompts, model, base = [], [], []
    for p in range(9):  # unequal seeds per prompt, integer scores so there are ties
        for _ in range(1 + p % 3):
            prompts.append(f"prompt-{p}")
            model.append(float(rng.integers(0, 4)))
            base.append(float(rng.integers(0, 3)))
    r = paired_comparison(prompts, model, base, seed=11, n_boot=300)
    wr, half, diff = _loop_bootstrap(prompts, model, base, 11, 300)
    assert r["ties"] > 0
    assert r["win_rate_ci"] == pytest.approx(wr, abs=1e-12)
    assert r["win_rate_ties_half_ci"] == pytest.approx(half, abs=1e-12)
    assert r["mean_diff_ci"] == pytest.approx(diff, abs=1e-12)
    assert paired_comparison(prompts, model, base, seed=11, n_boot=300) == r  # same seed, same figures
    assert paired_comparison(prompts, model, base, seed=12, n_boot=300)["win_rate_ci"] != r["win_rate_ci"]
    # the interval is over prompts, not pairs: more resamples than the chunk size give the same loop result
    r2 = paired_comparison(prompts, model, base, seed=3, n_boot=700)
    assert r2["mean_diff_ci"] == pytest.approx(_loop_bootstrap(prompts, model, base, 3, 700)[2], abs=1e-12)


def test_bootstrap_indices_are_the_documented_draws():
    got = bootstrap_indices(5, 4, seed=9)
    assert got.shape == (4, 5) and np.array_equal(got, np.random.default_rng(9).integers(0, 5, size=(4, 5)))


def test_interval_covers_the_true_win_rate_at_about_95_percent_with_correlated_seeds():
    # prompts differ in difficulty (a per-prompt win probability q ~ U(0.2, 1), mean 0.6) and 4 seeds of a
    # prompt share it, so pairs are correlated within a prompt. Resampling prompts keeps that; resampling
    # pairs as if independent (each pair its own "prompt") makes the interval too narrow.
    rng = np.random.default_rng(0)
    covered, naive, reps = 0, 0, 200
    for rep in range(reps):
        q = rng.uniform(0.2, 1.0, size=40)
        model = (rng.random((40, 4)) < q[:, None]).ravel().astype(float)
        base = np.full(model.shape, 0.5)
        r = paired_comparison(np.repeat([f"p{i}" for i in range(40)], 4), model, base, seed=rep, n_boot=400)
        covered += r["win_rate_ci"][0] <= 0.6 <= r["win_rate_ci"][1]
        r = paired_comparison([f"pair{i}" for i in range(160)], model, base, seed=rep, n_boot=400)
        naive += r["win_rate_ci"][0] <= 0.6 <= r["win_rate_ci"][1]
    assert 0.9 <= covered / reps <= 0.985, covered / reps
    assert naive / reps < covered / reps - 0.03, (naive / reps, covered / reps)


def test_all_ties_and_no_pairs():
    r = paired_comparison(["a", "a", "b"], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0], seed=0, n_boot=100)
    assert (r["wins"], r["losses"], r["ties"], r["win_rate"], r["tie_rate"]) == (0, 0, 3, 0.0, 1.0)
    assert r["p_value"] is None  # the sign test drops ties: nothing left to test
    assert r["win_rate_ties_half"] == 0.5 and r["win_rate_ties_half_ci"] == [0.5, 0.5]
    assert r["win_rate_ci"] == [0.0, 0.0] and r["mean_diff"] == 0.0 and r["mean_diff_ci"] == [0.0, 0.0]
    empty = paired_comparison([], [], [], seed=0, n_boot=100)
    assert empty["n_pairs"] == 0 and empty["win_rate"] is None and empty["win_rate_ci"] is None
    assert empty["p_value"] is None and empty["mean_diff_ci"] is None
    with pytest.raises(ValueError, match="finite"):
        paired_comparison(["a"], [float("nan")], [1.0], seed=0, n_boot=10)
    with pytest.raises(ValueError, match="aligned"):
        paired_comparison(["a", "b"], [1.0], [1.0], seed=0, n_boot=10)


def test_mean_with_interval_is_a_percentile_of_prompt_resampled_means():
    prompts = ["x", "x", "y", "z", "z", "z"]
    v = np.array([0.0, 1.0, 0.5, 1.0, 1.0, 0.25])
    r = mean_with_interval(prompts, v, seed=4, n_boot=250)
    order = ["x", "y", "z"]
    idx = np.random.default_rng(4).integers(0, 3, size=(250, 3))
    means = [np.mean([v[i] for k in row for i, p in enumerate(prompts) if p == order[k]]) for row in idx]
    assert r["n"] == 6 and r["mean"] == pytest.approx(v.mean())
    assert r["mean_ci"] == pytest.approx(list(np.quantile(means, [0.025, 0.975])), abs=1e-12)
    assert mean_with_interval([], np.array([]), seed=0, n_boot=10) == {"n": 0, "mean": None, "mean_ci": None}


def test_syn_pic_phi_by_hand_and_against_the_labelling_aggregator():
    # 3 images, 2 judges. judge 0: 3 > 2 = 2 (image 0 beats both, 1 and 2 tie); judge 1: 0 < 1 < 5
    one = np.array([[[3.0, 0.0], [2.0, 1.0], [2.0, 5.0]]])
    # image 0: wins 2 (judge 0) + 0 = 2 of 4; image 1: 0 + 1 = 1 of 4; image 2: 0 + 2 = 2 of 4
    assert syn_pic_phi(one).tolist() == [[0.5, 0.25, 0.5]]
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 3, size=(50, 4, 3)).astype(float)  # small integers: many ties
    label = get_aggregator("syn_pic").fn
    expected = np.stack([label(g, None, {}, {})[1] for g in scores])
    assert np.allclose(syn_pic_phi(scores), expected, atol=0, rtol=1e-15)
    with pytest.raises(ValueError, match="k >= 2"):
        syn_pic_phi(np.zeros((3, 1, 2)))
