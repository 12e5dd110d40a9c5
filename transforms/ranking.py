"""Rank one prompt's candidates (Syn-Pic labels by default, or another registered aggregator) and build
its preference pairs. Dataset-wide statistics an aggregator needs come from a Beam combine over all
scored candidates and reach the ranking DoFn as a side input (a dict); RankGroups also returns them
as its ``stats`` output (one dict) so the manifest can report them."""
from __future__ import annotations

from fractions import Fraction
from typing import Mapping, Optional, Sequence

import apache_beam as beam
import numpy as np

from ..schemas.records import Candidate, Drop, PreferencePair, PromptRecord, RankedCandidate, RankedGroup
from . import aggregators as agg
from .aggregators import get_aggregator, strict_prefers, strict_wins
from .candidate_filters import STAGE as CANDIDATE_FILTER_STAGE, filter_group

DROPPED = "dropped"
STATS = "stats"
_WEIGHT_DENOMINATOR = 10 ** 9  # estimated weights are rounded to exact fractions with this denominator bound


def rank_order(phi: np.ndarray, ids: Sequence[str]) -> list[int]:
    """Indices sorted by phi (highest first); equal phi broken by candidate id, so the order is deterministic."""
    return sorted(range(len(ids)), key=lambda i: (-float(phi[i]), ids[i]))


def pair_agreement(scores: np.ndarray) -> np.ndarray:
    """A[i, j] = fraction of rewards scoring i strictly above j."""
    return strict_wins(scores) / float(scores.shape[1])


def weights_for(aggregator: str, rewards: Sequence[str], reward_weights: Optional[Mapping[str, float]] = None,
                stats: Optional[Mapping] = None) -> list[Fraction]:
    """Exact per-reward weights: the estimated reliabilities for ``reliability_weighted`` (from ``stats``),
    else ``reward_weights`` (missing names weigh 1; decimal values read exactly, 0.1 is 1/10)."""
    if not get_aggregator(aggregator).uses_config_weights:
        if not stats or "weight" not in stats:
            raise ValueError(f"aggregator {aggregator!r} needs the dataset statistics (estimated weights)")
        return [Fraction(float(stats["weight"][r])).limit_denominator(_WEIGHT_DENOMINATOR) for r in rewards]
    reward_weights = reward_weights or {}
    return [Fraction(str(reward_weights.get(r, 1))) for r in rewards]


def weighted_agreement(scores: np.ndarray, weights: Sequence[Fraction]) -> list[list[Fraction]]:
    """A[i][j] = sum of the weights of rewards scoring i strictly above j / sum of all weights, exactly."""
    prefers = strict_prefers(scores)
    k, _, n = prefers.shape
    total = sum(weights)
    return [[sum((weights[l] for l in range(n) if prefers[i, j, l]), Fraction(0)) / total for j in range(k)]
            for i in range(k)]


def rank_candidates(prompt: PromptRecord, candidates: Sequence[Candidate], rewards: Sequence[str],
                    aggregator: str = "syn_pic", reward_weights: Optional[Mapping[str, float]] = None,
                    stats: Optional[Mapping] = None, zscore_scope: str = "dataset") -> RankedGroup:
    """Labels for one prompt: phi, ranks (1 = best) and every pair oriented winner-first.

    ``rewards`` are the ranking rewards; each candidate keeps all its scores (a filter-only
    reward's too, for the shards and the index). Pairs with equal phi are kept here, oriented by
    rank, with the phi tie visible (the filter drops them with a reason). A pair's agreement is the
    weighted fraction of rewards scoring the winner strictly higher. With equal weights (the default) ``wins``/``n_rewards`` are the integer
    vote count and the number of rewards; with unequal weights they are the numerator and denominator
    of the exact weighted agreement (so the filter still compares exact fractions).
    """
    candidates = sorted(candidates, key=lambda c: c.candidate_id)
    ids = [c.candidate_id for c in candidates]
    scores = np.array([[c.scores[r] for r in rewards] for c in candidates], dtype=np.float64)
    phi, weights = label_table(scores, rewards, aggregator, reward_weights, stats, zscore_scope)
    order = rank_order(phi, ids)
    ranked = tuple(
        RankedCandidate(candidate_id=ids[i], image_uri=candidates[i].image_uri,
                        image_sha256=candidates[i].image_sha256, rank=r + 1, phi=float(phi[i]),
                        scores={name: float(v) for name, v in candidates[i].scores.items()},
                        lineage=candidates[i].lineage, dhash=candidates[i].dhash)
        for r, i in enumerate(order))
    pairs = tuple(
        PreferencePair(prompt_id=prompt.prompt_id, winner_id=ids[w], loser_id=ids[l], phi_winner=float(phi[w]),
                       phi_loser=float(phi[l]), agreement=float(num) / den, wins=num, n_rewards=den)
        for a, w in enumerate(order) for l in order[a + 1:]
        for num, den in [pair_votes(scores, weights, w, l)])
    return RankedGroup(prompt=prompt, rewards=tuple(rewards), aggregator=aggregator, candidates=ranked, pairs=pairs)


def label_table(scores: np.ndarray, rewards: Sequence[str], aggregator: str = "syn_pic",
                reward_weights: Optional[Mapping[str, float]] = None, stats: Optional[Mapping] = None,
                zscore_scope: str = "dataset") -> tuple[np.ndarray, list[Fraction]]:
    """(phi [k], exact weights [n]) of one score table under ``aggregator``."""
    spec = get_aggregator(aggregator)
    weights = weights_for(aggregator, rewards, reward_weights, stats)
    need = spec.needs_stats({"zscore_scope": zscore_scope})
    if need and not stats:
        raise ValueError(f"aggregator {aggregator!r} needs dataset statistics ({need}); none were given")
    _, phi = spec.fn(scores, np.array([float(w) for w in weights]), stats or {},
                     {"reward_names": list(rewards), "zscore_scope": zscore_scope})
    return phi, weights


def pair_votes(scores: np.ndarray, weights: Sequence[Fraction], w: int, l: int) -> tuple[int, int]:
    """(wins, n_rewards) of pair (w, l): integer votes over n rewards when the weights are all equal,
    else the exact weighted agreement as numerator/denominator."""
    prefers = scores[w] > scores[l]
    if all(x == weights[0] for x in weights):
        return int(prefers.sum()), len(weights)
    frac = sum((x for x, p in zip(weights, prefers) if p), Fraction(0)) / sum(weights)
    return frac.numerator, frac.denominator


# ---- dataset-wide statistics (Beam combines)

class _MomentsFn(beam.CombineFn):
    """Per-reward count, mean and population sd over every scored candidate (Welford / Chan merge)."""

    def __init__(self, rewards: Sequence[str]):
        self.rewards = list(rewards)

    def create_accumulator(self):
        return {}

    def add_input(self, acc, element):
        _, cand = element
        return agg.moments_add(acc, {r: cand.scores[r] for r in self.rewards if r in cand.scores})

    def merge_accumulators(self, accs):
        return agg.moments_merge(accs)

    def extract_output(self, acc):
        return agg.moments_extract(acc)


class _ReliabilityFn(beam.CombineFn):
    """Leave-one-out agreement counts per reward, summed over every rankable prompt."""

    def __init__(self, rewards: Sequence[str]):
        self.rewards = list(rewards)

    def create_accumulator(self):
        return np.zeros(len(self.rewards), np.int64), np.zeros(len(self.rewards), np.int64)

    def add_input(self, acc, scores):
        a, n = agg.reliability_counts(scores)
        return acc[0] + a, acc[1] + n

    def merge_accumulators(self, accs):
        accs = list(accs)
        return sum((a for a, _ in accs), np.zeros(len(self.rewards), np.int64)), \
            sum((n for _, n in accs), np.zeros(len(self.rewards), np.int64))

    def extract_output(self, acc):
        return agg.reliability_from_counts(dict(zip(self.rewards, acc[0].tolist())),
                                           dict(zip(self.rewards, acc[1].tolist())), self.rewards)


class _FilterCandidates(beam.DoFn):
    """One grouped prompt -> the same with ``candidate_filters.filter_group`` applied; drops on the side.

    A group the filters drop as a whole (``low_diversity_group``) is dropped at prompt level with
    its remaining candidates as ``group_dropped``, and goes no further.
    """

    def __init__(self, cfg):
        self.cfg = cfg

    def process(self, element):
        prompt_id, grouped = element
        prompts, candidates = list(grouped["prompt"]), list(grouped["candidates"])
        if not prompts:  # orphans: _RankGroup accounts for them
            yield prompt_id, {"prompt": prompts, "candidates": candidates}
            return
        verdict = filter_group(candidates, self.cfg)
        for c, reason, detail in verdict.dropped:
            yield beam.pvalue.TaggedOutput(DROPPED, Drop("candidate", reason, c.candidate_id,
                                                         CANDIDATE_FILTER_STAGE, detail))
        if verdict.group_reason:
            p = prompts[0]
            yield beam.pvalue.TaggedOutput(DROPPED, Drop("prompt", verdict.group_reason, f"{p.source}#{p.source_index}",
                                                         CANDIDATE_FILTER_STAGE,
                                                         f"prompt_id {prompt_id}: {verdict.group_detail}"))
            return
        yield prompt_id, {"prompt": prompts, "candidates": list(verdict.kept)}


def _candidates_of(element):
    prompt_id, grouped = element
    for c in grouped["candidates"]:
        yield prompt_id, c


class _RankGroup(beam.DoFn):
    def __init__(self, rewards: Sequence[str], aggregator: str, min_candidates: int,
                 reward_weights: Optional[Mapping[str, float]] = None, zscore_scope: str = "dataset"):
        self.rewards, self.aggregator, self.min_candidates = list(rewards), aggregator, min_candidates
        self.reward_weights, self.zscore_scope = dict(reward_weights or {}), zscore_scope

    def process(self, element, stats=None):
        prompt_id, grouped = element
        prompts: list[PromptRecord] = list(grouped["prompt"])
        candidates: list[Candidate] = list(grouped["candidates"])
        if not prompts:  # cannot happen unless inputs are inconsistent; never lose the candidates silently
            for c in candidates:
                yield beam.pvalue.TaggedOutput(DROPPED, Drop("candidate", "orphan_candidate", c.candidate_id, "rank"))
            return
        if len(candidates) < self.min_candidates:
            p = prompts[0]
            yield beam.pvalue.TaggedOutput(DROPPED, Drop(
                "prompt", "too_few_candidates", f"{p.source}#{p.source_index}", "rank",
                f"prompt_id {prompt_id}: {len(candidates)} usable candidate(s), need {self.min_candidates}"))
            for c in candidates:
                yield beam.pvalue.TaggedOutput(DROPPED, Drop("candidate", "group_dropped", c.candidate_id, "rank"))
            return
        yield rank_candidates(prompts[0], candidates, self.rewards, self.aggregator, self.reward_weights,
                              stats, self.zscore_scope)


def _rankable_table(rewards: Sequence[str], min_candidates: int):
    def fn(element):
        _, grouped = element
        candidates = sorted(grouped["candidates"], key=lambda c: c.candidate_id)
        if list(grouped["prompt"]) and len(candidates) >= min_candidates:
            yield np.array([[c.scores[r] for r in rewards] for c in candidates], dtype=np.float64)
    return fn


class GroupByPrompt(beam.PTransform):
    """(PromptRecord, (prompt_id, Candidate)) -> (prompt_id, {"prompt": [...], "candidates": [...]}).

    The CoGroupByKey carries prompt text, ids, scores and staging URIs, never pixels."""

    def expand(self, inputs):
        prompts, scored = inputs
        keyed_prompts = prompts | "KeyPrompts" >> beam.Map(lambda p: (p.prompt_id, p))
        return {"prompt": keyed_prompts, "candidates": scored} | "CoGroup" >> beam.CoGroupByKey()


class FilterCandidates(beam.PTransform):
    """Grouped prompts -> the same with ``candidate_filters.filter_group`` applied (a FilterConfig's
    candidate filters); ``{"groups", "dropped"}``. Runs before ranking, so labels and dataset statistics
    see only the candidates that are kept."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def expand(self, grouped):
        checked = grouped | "Check" >> beam.ParDo(_FilterCandidates(self.cfg)).with_outputs(DROPPED, main="groups")
        return {"groups": checked.groups, "dropped": checked[DROPPED]}


class RankGroups(beam.PTransform):
    """Grouped prompts (``GroupByPrompt``'s output, or the (prompts, scored) pair it takes) -> RankedGroup per
    prompt; drops on the side. ``stats``: one dict with the aggregator, its reward weights and any
    dataset-wide statistics (``moments``: count/mean/sd per reward; ``reliability``: agree/weight per
    reward), for the manifest.
    """

    def __init__(self, rewards: Sequence[str], aggregator: str = "syn_pic", min_candidates: int = 2,
                 reward_weights: Optional[Mapping[str, float]] = None, zscore_scope: str = "dataset"):
        super().__init__()
        get_aggregator(aggregator)  # fail at construction on an unknown name
        self.rewards, self.aggregator, self.min_candidates = list(rewards), aggregator, min_candidates
        self.reward_weights, self.zscore_scope = dict(reward_weights or {}), zscore_scope

    def expand(self, inputs):
        grouped = inputs | "GroupByPrompt" >> GroupByPrompt() if isinstance(inputs, tuple) else inputs
        scored = grouped | "Candidates" >> beam.FlatMap(_candidates_of)  # statistics see what is ranked
        spec = get_aggregator(self.aggregator)
        need = spec.needs_stats({"zscore_scope": self.zscore_scope})
        header = {"aggregator": self.aggregator, "zscore_scope": self.zscore_scope,
                  "reward_weights": ({r: float(self.reward_weights.get(r, 1)) for r in self.rewards}
                                     if spec.uses_config_weights else None)}
        if need == "moments":
            raw = scored | "DatasetMoments" >> beam.CombineGlobally(_MomentsFn(self.rewards))
        elif need == "reliability":
            raw = (grouped | "ScoreTables" >> beam.FlatMap(_rankable_table(self.rewards, self.min_candidates))
                   | "RewardReliability" >> beam.CombineGlobally(_ReliabilityFn(self.rewards)))
        else:
            raw = None
        if raw is None:
            stats = scored.pipeline | "NoDatasetStats" >> beam.Create([{**header, need or "dataset_stats": None}])
            labels = beam.ParDo(_RankGroup(
                self.rewards, self.aggregator, self.min_candidates, self.reward_weights, self.zscore_scope))
        else:
            stats = raw | "StatsRecord" >> beam.Map(lambda s, h=header, k=need: {**h, k: s})
            labels = beam.ParDo(
                _RankGroup(self.rewards, self.aggregator, self.min_candidates, self.reward_weights,
                           self.zscore_scope), stats=beam.pvalue.AsSingleton(raw))
        out = grouped | "RankLabels" >> labels.with_outputs(DROPPED, main="groups")
        return {"groups": out.groups, "dropped": out[DROPPED], STATS: stats}
