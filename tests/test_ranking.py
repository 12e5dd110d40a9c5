"""Syn-Pic labels (arXiv 2410.18013 Alg. 1; docs/math.md s.1) and the noisy-pair filter, on score tables worked out by hand."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from synpref.schemas.config import FilterConfig
from synpref.schemas.records import Candidate, Lineage, PromptRecord
from synpref.transforms.aggregators import syn_pic_win_rate
from synpref.transforms.filtering import FilterPairs, keep_pair
from synpref.transforms.ranking import RankGroups, rank_candidates

REWARDS = ["r0", "r1", "r2"]
PROMPT = PromptRecord("p1", "a red cube")


def cand(cid, scores, prompt_id="p1"):
    lineage = Lineage("g", "m", "main", "P", "S", 2, 5.0, 64, 64, "float32", 0)
    names = REWARDS if len(scores) <= len(REWARDS) else [f"r{i}" for i in range(len(scores))]
    return Candidate(cid, prompt_id, "a red cube", lineage, image_uri=f"mem://{cid}.png", image_sha256="0" * 64,
                     scores=dict(zip(names, scores)))


# Rows a, b, c; columns r0, r1, r2.
#   r0: a(3) > b(2) > c(1)        -> wins a:2 b:1 c:0
#   r1: b(2) = c(2) > a(1)        -> wins a:0 b:1 c:1  (the b/c tie gives nothing)
#   r2: b(5) > c(1) > a(0)        -> wins a:0 b:2 c:1
# C = a:2, b:4, c:2 ; n(k-1) = 3*2 = 6 -> phi = 1/3, 2/3, 1/3
TABLE = {"a": [3, 1, 0], "b": [2, 2, 5], "c": [1, 2, 1]}


def test_win_rate_counts_strict_wins_only():
    phi = syn_pic_win_rate(np.array(list(TABLE.values()), dtype=float))
    assert phi.tolist() == pytest.approx([2 / 6, 4 / 6, 2 / 6])


def test_phi_takes_values_in_multiples_of_one_over_n_k_minus_1():
    rng = np.random.default_rng(0)
    phi = syn_pic_win_rate(rng.normal(size=(4, 5)))  # k=4, n=5: phi in {0, 1/15, ..., 1}
    assert np.allclose(phi * 15, np.round(phi * 15))
    assert 0 <= phi.min() and phi.max() <= 1


def test_identical_scores_tie_everywhere():
    assert syn_pic_win_rate(np.ones((3, 2))).tolist() == [0.0, 0.0, 0.0]


def test_ranks_phi_and_pair_agreement():
    group = rank_candidates(PROMPT, [cand(k, v) for k, v in TABLE.items()], REWARDS)
    # b first; a and c tie on phi and are ordered by candidate id.
    assert [(c.candidate_id, c.rank, c.phi) for c in group.candidates] == [
        ("b", 1, pytest.approx(2 / 3)), ("a", 2, pytest.approx(1 / 3)), ("c", 3, pytest.approx(1 / 3))]
    assert group.candidates[0].scores == {"r0": 2.0, "r1": 2.0, "r2": 5.0}
    # agreement = fraction of rewards scoring the winner strictly higher:
    #   b>a: r0 no, r1 yes, r2 yes = 2/3 ; b>c: r0 yes, r1 tie, r2 yes = 2/3 ; a>c: r0 yes only = 1/3
    assert [(p.winner_id, p.loser_id, p.agreement) for p in group.pairs] == [
        ("b", "a", pytest.approx(2 / 3)), ("b", "c", pytest.approx(2 / 3)), ("a", "c", pytest.approx(1 / 3))]


def test_ranking_does_not_depend_on_input_order():
    forward = rank_candidates(PROMPT, [cand(k, v) for k, v in TABLE.items()], REWARDS)
    backward = rank_candidates(PROMPT, [cand(k, v) for k, v in reversed(TABLE.items())], REWARDS)
    assert forward == backward


@pytest.mark.parametrize("cfg, expected", [
    (FilterConfig(), [True, True, (False, "tied_phi")]),
    (FilterConfig(min_agreement_margin=0.2), [(False, "low_agreement"), (False, "low_agreement"), (False, "tied_phi")]),
    (FilterConfig(require_unanimous=True), [(False, "not_unanimous"), (False, "not_unanimous"), (False, "tied_phi")]),
])
def test_filter_verdicts(cfg, expected):
    group = rank_candidates(PROMPT, [cand(k, v) for k, v in TABLE.items()], REWARDS)
    assert [keep_pair(p, cfg) for p in group.pairs] == expected


def test_agreement_of_exactly_half_is_dropped_even_when_phi_differs():
    # Two rewards.  r0: a(3) > c(2) > b(1) ; r1: b(2) > a(1) > c(0)
    # a wins b,c on r0 (2) and c on r1 (1) = 3 -> phi 3/4;
    # b wins a,c on r1 = 2 -> 2/4, c wins b on r0 = 1 -> 1/4.
    group = rank_candidates(PROMPT, [cand("a", [3, 1]), cand("b", [1, 2]), cand("c", [2, 0])], ["r0", "r1"])
    assert [c.phi for c in group.candidates] == [0.75, 0.5, 0.25]
    verdicts = {(p.winner_id, p.loser_id): (p.agreement, keep_pair(p, FilterConfig())) for p in group.pairs}
    assert verdicts == {("a", "b"): (0.5, (False, "low_agreement")), ("a", "c"): (1.0, True),
                        ("b", "c"): (0.5, (False, "low_agreement"))}


def test_rank_and_filter_in_beam_account_for_every_group_and_pair():
    prompts = [PROMPT, PromptRecord("p2", "lonely", source="f", source_index=2),
               PromptRecord("p3", "nobody", source="f", source_index=3)]
    scored = [("p1", cand(k, v)) for k, v in TABLE.items()] + [("p2", cand("z", [1, 1, 1], "p2"))]
    with TestPipeline() as p:
        ranked = (p | "P" >> beam.Create(prompts), p | "S" >> beam.Create(scored)) | RankGroups(REWARDS)
        filtered = ranked["groups"] | FilterPairs(FilterConfig())
        assert_that(filtered["groups"] | beam.Map(lambda g: (g.prompt.prompt_id, [q.key for q in g.pairs])),
                    equal_to([("p1", ["b__a", "b__c"])]), label="groups")
        drops = (ranked["dropped"], filtered["dropped"]) | beam.Flatten()
        assert_that(drops | beam.Map(lambda d: (d.level, d.reason, d.record_id)), equal_to([
            ("prompt", "too_few_candidates", "f#2"), ("candidate", "group_dropped", "z"),
            ("prompt", "too_few_candidates", "f#3"), ("pair", "tied_phi", "a__c")]), label="drops")


def test_margin_is_compared_exactly_four_of_five_at_margin_three_tenths_is_dropped():
    """4 of 5 rewards agree: 0.8 - 0.5 is 0.30000000000000004 in floats; exactly 3/10, not above 0.3."""
    rewards = [f"r{i}" for i in range(5)]
    group = rank_candidates(PROMPT, [cand("a", [2, 2, 2, 2, 0]), cand("b", [1, 1, 1, 1, 1])], rewards)
    (pair,) = group.pairs
    assert (pair.winner_id, pair.wins, pair.n_rewards) == ("a", 4, 5)
    assert 0.8 - 0.5 > 0.3  # the float trap this guards against
    assert keep_pair(pair, FilterConfig(min_agreement_margin=0.3)) == (False, "low_agreement")
    assert keep_pair(pair, FilterConfig(min_agreement_margin=0.29)) is True
