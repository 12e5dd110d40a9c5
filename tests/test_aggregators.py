"""Aggregators (docs/math.md s.1) on small hand-made tables, values worked out independently here;
weighted agreement in exact fractions; dataset statistics through Beam; config validation."""
import math
import statistics
from fractions import Fraction

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from synpref.demo.run import demo_config
from synpref.schemas.config import FilterConfig, build_config_from_dict
from synpref.schemas.loading import apply_overrides
from synpref.schemas.records import Candidate, Lineage, PromptRecord
from synpref.transforms.aggregators import available_aggregators, dataset_stats, get_aggregator
from synpref.transforms.filtering import FilterPairs, keep_pair
from synpref.transforms.ranking import RankGroups, label_table, rank_candidates

PROMPT = PromptRecord("p1", "a red cube")
R2 = ["r0", "r1"]
# Rows a, b, c; columns r0, r1.
#   r0: c(4) > b(2) > a(1)   r1: b(30) > c(20) > a(10)
T2 = np.array([[1.0, 10.0], [2.0, 30.0], [4.0, 20.0]])


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def cand(cid, scores, names, prompt_id="p1"):
    lineage = Lineage("g", "m", "main", "P", "S", 2, 5.0, 64, 64, "float32", 0)
    return Candidate(cid, prompt_id, "x", lineage, f"mem://{cid}.png", "0" * 64, dict(zip(names, scores)))


def phi(aggregator, table, names, **kw):
    return label_table(np.asarray(table, dtype=float), names, aggregator, **kw)[0].tolist()


def test_registry_names():
    assert available_aggregators() == ["mean_bt", "mean_zscore", "reliability_weighted", "syn_pic", "weighted_sum"]
    with pytest.raises(ValueError, match="unknown aggregator 'borda'"):
        get_aggregator("borda")


def test_syn_pic_unweighted_is_the_win_rate_and_weighted_weighs_each_reward():
    # wins: r0 a0 b1 c2 ; r1 a0 b2 c1 -> C = 0, 3, 3 over n(k-1) = 4
    assert phi("syn_pic", T2, R2) == pytest.approx([0, 3 / 4, 3 / 4])
    # weights 1, 3: b (1*1 + 3*2) / (4*2) = 7/8 ; c (1*2 + 3*1) / 8 = 5/8
    assert phi("syn_pic", T2, R2, reward_weights={"r1": 3}) == pytest.approx([0, 7 / 8, 5 / 8])


def test_mean_bt_uses_dataset_sd():
    stats = {"mean": {"r0": 0.0, "r1": 0.0}, "sd": {"r0": 2.0, "r1": 10.0}}
    s = {"r0": 2.0, "r1": 10.0}

    def p(i, j, w=(1.0, 1.0)):
        return (w[0] * sig((T2[i, 0] - T2[j, 0]) / s["r0"]) + w[1] * sig((T2[i, 1] - T2[j, 1]) / s["r1"])) / sum(w)

    expected = [(p(0, 1) + p(0, 2)) / 2, (p(1, 0) + p(1, 2)) / 2, (p(2, 0) + p(2, 1)) / 2]
    assert phi("mean_bt", T2, R2, stats=stats) == pytest.approx(expected)
    # by hand for a: P_ab = (sig(-1/2) + sig(-2)) / 2, P_ac = (sig(-3/2) + sig(-1)) / 2
    assert phi("mean_bt", T2, R2, stats=stats)[0] == pytest.approx(
        ((sig(-0.5) + sig(-2)) / 2 + (sig(-1.5) + sig(-1)) / 2) / 2)
    w = (1.0, 3.0)
    assert phi("mean_bt", T2, R2, stats=stats, reward_weights={"r1": 3})[2] == pytest.approx(
        (p(2, 0, w) + p(2, 1, w)) / 2)
    labels = phi("mean_bt", T2, R2, stats=stats)
    assert sum(labels) == pytest.approx(3 / 2)  # P_ij + P_ji = 1: labels sum to k/2


def test_mean_zscore_dataset_and_prompt_scope():
    stats = {"mean": {"r0": 2.0, "r1": 20.0}, "sd": {"r0": 2.0, "r1": 10.0}}
    # z: a (-1/2, -1), b (0, 1), c (1, 0) -> a = -3/4, 1/2, 1/2
    assert phi("mean_zscore", T2, R2, stats=stats) == pytest.approx(
        [sig(-1.25), (sig(1.25) + 0.5) / 2, (sig(1.25) + 0.5) / 2])
    # weights (1, 3): a = (-1/2 - 3) / 4 = -7/8, b = 3/4, c = 1/4
    a = [-7 / 8, 3 / 4, 1 / 4]
    assert phi("mean_zscore", T2, R2, stats=stats, reward_weights={"r1": 3}) == pytest.approx(
        [(sig(a[i] - a[j]) + sig(a[i] - a[m])) / 2 for i, j, m in [(0, 1, 2), (1, 0, 2), (2, 0, 1)]])
    # per prompt: population mean/sd of each column of this table only; no dataset statistics needed
    z = [[(T2[i, l] - statistics.mean(T2[:, l])) / statistics.pstdev(T2[:, l]) for l in range(2)] for i in range(3)]
    a = [sum(row) / 2 for row in z]
    assert phi("mean_zscore", T2, R2, zscore_scope="prompt") == pytest.approx(
        [(sig(a[i] - a[j]) + sig(a[i] - a[m])) / 2 for i, j, m in [(0, 1, 2), (1, 0, 2), (2, 0, 1)]])
    assert get_aggregator("mean_zscore").needs_stats({"zscore_scope": "prompt"}) is None


def test_weighted_sum_raw_scales():
    # weights (2, 1): a = 12, b = 34, c = 28
    a = [12.0, 34.0, 28.0]
    assert phi("weighted_sum", T2, R2, reward_weights={"r0": 2}) == pytest.approx(
        [(sig(a[i] - a[j]) + sig(a[i] - a[m])) / 2 for i, j, m in [(0, 1, 2), (1, 0, 2), (2, 0, 1)]])


# Three rewards; r2 disagrees with the others.
#   (a,b): r0 b, r1 b, r2 a   (a,c): r0 c, r1 c, r2 a   (b,c): r0 c, r1 c, r2 c
# Leave-one-out: for r0 the others (r1, r2) tie on (a,b) and (a,c); on (b,c) both say c = r0's vote:
# agree 1/1. Same for r1. For r2 the others (r0, r1) decide all three pairs; r2 agrees on (b,c) only:
# 1/3. Weights max(0, 2 agree - 1) = 1, 1, 0.
R3 = ["r0", "r1", "r2"]
T3 = np.array([[1.0, 1.0, 3.0], [2.0, 2.0, 1.0], [3.0, 3.0, 2.0]])


def test_reliability_weights_by_hand():
    stats = dataset_stats([T3], R3, "reliability")
    assert stats["agree"] == pytest.approx({"r0": 1.0, "r1": 1.0, "r2": 1 / 3})
    assert stats["weight"] == pytest.approx({"r0": 1.0, "r1": 1.0, "r2": 0.0})
    assert stats["pairs"] == {"r0": 1, "r1": 1, "r2": 3} and not stats["fallback_equal_weights"]
    # Syn-Pic with weights 1, 1, 0: r0 and r1 both rank c > b > a
    assert phi("reliability_weighted", T3, R3, stats=stats) == pytest.approx([0.0, 0.5, 1.0])
    group = rank_candidates(PROMPT, [cand(k, v, R3) for k, v in zip("abc", T3)], R3, "reliability_weighted",
                            stats=stats)
    # r2 weighs 0, so every pair is unanimous among the rewards that count
    assert [(p.winner_id, p.loser_id, p.agreement) for p in group.pairs] == [
        ("c", "b", 1.0), ("c", "a", 1.0), ("b", "a", 1.0)]
    assert all(keep_pair(p, FilterConfig(require_unanimous=True)) is True for p in group.pairs)
    with pytest.raises(ValueError, match="needs the dataset statistics"):
        rank_candidates(PROMPT, [cand(k, v, R3) for k, v in zip("abc", T3)], R3, "reliability_weighted")


def test_reliability_falls_back_to_equal_weights_when_nothing_is_reliable():
    stats = dataset_stats([np.array([[1.0, 2.0], [2.0, 1.0]])], R2, "reliability")  # two rewards that always disagree
    assert stats["agree"] == {"r0": 0.0, "r1": 0.0}
    assert stats["weight"] == {"r0": 1.0, "r1": 1.0} and stats["fallback_equal_weights"]


def test_reliability_weighted_gives_an_adversarial_reward_weight_zero():
    rng = np.random.default_rng(7)
    quality = np.arange(4.0)
    tables = quality[None, :, None] + rng.normal(0, 1.0, size=(500, 4, 5))
    tables[:, :, 3] = -quality[None, :] + rng.normal(0, 1.0, size=(500, 4))
    names = [f"r{i}" for i in range(5)]
    stats = dataset_stats(tables, names, "reliability")
    assert stats["weight"]["r3"] == 0.0 and stats["agree"]["r3"] < 0.3
    assert all(stats["weight"][r] > 0.4 for r in names if r != "r3")


def test_dataset_moments_match_numpy():
    rng = np.random.default_rng(1)
    tables = rng.normal(3, 2, size=(7, 4, 2))
    stats = dataset_stats(tables, R2, "moments")
    flat = tables.reshape(-1, 2)
    assert stats["count"] == {"r0": 28, "r1": 28}
    assert [stats["mean"][r] for r in R2] == pytest.approx(flat.mean(axis=0).tolist())
    assert [stats["sd"][r] for r in R2] == pytest.approx(flat.std(axis=0).tolist())


def test_weighted_agreement_is_an_exact_fraction():
    # weights 0.1, 0.2, 0.2 (read as 1/10, 2/10, 2/10); a beats b on r0, r1: agreement exactly 3/5.
    # In floats (0.1 + 0.2) / 0.5 is 0.6000000000000001, which would pass margin 0.1.
    names = R3
    group = rank_candidates(PROMPT, [cand("a", [10, 10, 0], names), cand("b", [0, 0, 1], names)], names,
                            "weighted_sum", reward_weights={"r0": 0.1, "r1": 0.2, "r2": 0.2})
    (pair,) = group.pairs
    assert pair.winner_id == "a" and Fraction(pair.wins, pair.n_rewards) == Fraction(3, 5)
    assert (0.1 + 0.2) / (0.1 + 0.2 + 0.2) - 0.5 > 0.1  # the float trap
    assert keep_pair(pair, FilterConfig(min_agreement_margin=0.1)) == (False, "low_agreement")
    assert keep_pair(pair, FilterConfig(min_agreement_margin=0.09)) is True
    # 4 of 5 with equal weights stays an integer count
    five = [f"r{i}" for i in range(5)]
    (pair,) = rank_candidates(PROMPT, [cand("a", [2, 2, 2, 2, 0], five), cand("b", [1] * 5, five)], five,
                              "mean_zscore", zscore_scope="prompt").pairs
    assert (pair.wins, pair.n_rewards) == (4, 5)


def test_min_aggregate_gap_drops_close_labels_with_its_reason():
    group = rank_candidates(PROMPT, [cand(k, v, R2) for k, v in zip("abc", T2)], R2, "weighted_sum")
    # a = 11, 32, 24: phi of b and c differ by (sig(8) - sig(-8)) / 2 + ... ; a gap threshold between the
    # b-c gap and the others keeps only the pairs against a
    gaps = {(p.winner_id, p.loser_id): p.phi_winner - p.phi_loser for p in group.pairs}
    cut = (gaps[("b", "c")] + min(gaps[("b", "a")], gaps[("c", "a")])) / 2
    assert gaps[("b", "c")] < cut
    verdicts = {k: keep_pair(p, FilterConfig(min_aggregate_gap=cut))
                for k, p in zip(gaps, group.pairs)}
    assert verdicts == {("b", "c"): (False, "small_gap"), ("b", "a"): True, ("c", "a"): True}


def test_rank_groups_in_beam_with_dataset_statistics_side_input():
    tables = {"p1": T2, "p2": np.array([[0.0, 5.0], [6.0, 25.0]])}
    prompts = [PromptRecord(pid, pid) for pid in tables]
    scored = [(pid, cand(f"{pid}{c}", row, R2, pid)) for pid, t in tables.items() for c, row in zip("abc", t)]
    expected_stats = dataset_stats(list(tables.values()), R2, "moments")
    expected_groups = {pid: rank_candidates(PromptRecord(pid, pid), [s for k, s in scored if k == pid], R2,
                                            "mean_bt", stats=expected_stats) for pid in tables}
    with TestPipeline() as p:
        ranked = (p | "P" >> beam.Create(prompts), p | "S" >> beam.Create(scored)) | RankGroups(R2, "mean_bt")
        assert_that(ranked["stats"], equal_to([{"aggregator": "mean_bt", "zscore_scope": "dataset",
                                                 "reward_weights": {"r0": 1.0, "r1": 1.0},
                                                 "moments": expected_stats}]), label="stats")
        assert_that(ranked["groups"], equal_to(list(expected_groups.values())), label="groups")
        filtered = ranked["groups"] | FilterPairs(FilterConfig(min_aggregate_gap=0.99))
        assert_that(filtered["dropped"] | beam.Map(lambda d: d.reason), equal_to(["small_gap"] * 4), label="drops")


def test_rank_groups_in_beam_estimates_reliability():
    prompts = [PROMPT]
    scored = [("p1", cand(c, row, R3)) for c, row in zip("abc", T3)]
    with TestPipeline() as p:
        ranked = (p | "P" >> beam.Create(prompts), p | "S" >> beam.Create(scored)) | RankGroups(
            R3, "reliability_weighted")
        assert_that(ranked["stats"] | beam.Map(lambda s: (s["reward_weights"], s["reliability"]["weight"])),
                    equal_to([(None, {"r0": 1.0, "r1": 1.0, "r2": 0.0})]), label="stats")
        assert_that(ranked["groups"] | beam.Map(lambda g: [c.candidate_id for c in g.candidates]),
                    equal_to([["c", "b", "a"]]), label="order")


def base():
    return demo_config("demo_build.yaml", "/tmp/synpref-demo")


@pytest.mark.parametrize("override, message", [
    ({"ranking.reward_weights": {"hps": 2}}, "names unknown reward(s) ['hps']"),
    ({"ranking.reward_weights": {"clip_score": -1}}, "must be a finite number >= 0"),
    ({"ranking.reward_weights": {"clip_score": 0, "brisque": 0, "sharpness": 0}}, "at least one reward"),
    ({"ranking.zscore_scope": "batch"}, "is not one of ['dataset', 'prompt']"),
    ({"filter.min_aggregate_gap": 1.5}, "min_aggregate_gap must be in [0, 1]"),
])
def test_bad_ranking_configs_raise(override, message):
    with pytest.raises(ValueError) as err:
        build_config_from_dict(apply_overrides(base(), override))
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ({"ranking.aggregator": "borda"}, "config.ranking.aggregator: unknown aggregator 'borda'"),
    ({"ranking.aggregator": "reliability_weighted", "ranking.reward_weights": {"clip_score": 2}},
     "estimates its own reward weights"),
])
def test_aggregator_plugin_settings_are_checked_at_preflight(override, message):
    from synpref.pipelines.preflight import check_plugins

    with pytest.raises(ValueError) as err:
        check_plugins(build_config_from_dict(apply_overrides(base(), override)))
    assert message in str(err.value)


def test_good_ranking_config_parses():
    cfg = build_config_from_dict(apply_overrides(base(), {
        "ranking.aggregator": "mean_zscore", "ranking.reward_weights": {"clip_score": 2}, "filter.min_aggregate_gap": 0.08}))
    assert (cfg.ranking.aggregator, cfg.ranking.reward_weights, cfg.filter.min_aggregate_gap) == (
        "mean_zscore", {"clip_score": 2}, 0.08)


def test_a_build_with_reliability_weights_records_them_in_the_manifest(demo_models, tmp_path):
    """End to end: the aggregator named in config runs, and its estimated weights reach the manifest."""
    from conftest import tiny_build_config
    from synpref.pipelines.build_preferences import build
    from synpref.schemas.config import build_config_from_dict

    cfg = tiny_build_config(demo_models, tmp_path / "out", ranking={"aggregator": "reliability_weighted"})
    manifest = build(build_config_from_dict(cfg))["manifest"]
    assert manifest["aggregator"] == "reliability_weighted"
    assert manifest["ranking"]["aggregator"] == "reliability_weighted"
    rel = manifest["ranking"]["reliability"]
    assert set(rel["weight"]) == {"clip_score", "jpeg_compressibility", "sharpness"}
    for name, agree in rel["agree"].items():
        assert rel["weight"][name] == pytest.approx(max(0.0, 2 * agree - 1))
    assert all(level["balanced"] for level in manifest["counts"].values())
