"""Rank one prompt's candidates (Syn-Pic labels) and build its preference pairs."""
from __future__ import annotations

from typing import Sequence

import apache_beam as beam
import numpy as np

from synpref.schemas.records import Candidate, Drop, PreferencePair, PromptRecord, RankedCandidate, RankedGroup
from synpref.transforms.aggregators import get_aggregator, strict_wins

DROPPED = "dropped"


def rank_order(phi: np.ndarray, ids: Sequence[str]) -> list[int]:
    """Indices sorted by phi (highest first); equal phi broken by candidate id, so the order is deterministic."""
    return sorted(range(len(ids)), key=lambda i: (-float(phi[i]), ids[i]))


def pair_agreement(scores: np.ndarray) -> np.ndarray:
    """A[i, j] = fraction of rewards scoring i strictly above j."""
    return strict_wins(scores) / float(scores.shape[1])


def rank_candidates(prompt: PromptRecord, candidates: Sequence[Candidate], rewards: Sequence[str],
                    aggregator: str = "syn_pic") -> RankedGroup:
    """Syn-Pic labels for one prompt: phi, ranks (1 = best) and every pair oriented winner-first.

    Pairs with equal phi are kept here, oriented by rank, with the phi tie visible
    (the filter drops them with a reason).
    """
    candidates = sorted(candidates, key=lambda c: c.candidate_id)
    ids = [c.candidate_id for c in candidates]
    scores = np.array([[c.scores[r] for r in rewards] for c in candidates], dtype=np.float64)
    phi = get_aggregator(aggregator)(scores)
    wins = strict_wins(scores)
    agree = wins / float(scores.shape[1])
    order = rank_order(phi, ids)
    ranked = tuple(
        RankedCandidate(candidate_id=ids[i], image_uri=candidates[i].image_uri,
                        image_sha256=candidates[i].image_sha256, rank=r + 1, phi=float(phi[i]),
                        scores={name: float(scores[i, j]) for j, name in enumerate(rewards)},
                        lineage=candidates[i].lineage)
        for r, i in enumerate(order))
    pairs = tuple(
        PreferencePair(prompt_id=prompt.prompt_id, winner_id=ids[w], loser_id=ids[l], phi_winner=float(phi[w]),
                       phi_loser=float(phi[l]), agreement=float(agree[w, l]),
                       wins=int(wins[w, l]), n_rewards=len(rewards))
        for a, w in enumerate(order) for l in order[a + 1:])
    return RankedGroup(prompt=prompt, rewards=tuple(rewards), aggregator=aggregator, candidates=ranked, pairs=pairs)


class _RankGroup(beam.DoFn):
    def __init__(self, rewards: Sequence[str], aggregator: str, min_candidates: int):
        self.rewards, self.aggregator, self.min_candidates = list(rewards), aggregator, min_candidates

    def process(self, element):
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
        yield rank_candidates(prompts[0], candidates, self.rewards, self.aggregator)


class RankGroups(beam.PTransform):
    """(prompt_id, PromptRecord) + (prompt_id, Candidate) -> RankedGroup per prompt; drops on the side.

    The CoGroupByKey carries prompt text, ids, scores and staging URIs, never pixels.
    """

    def __init__(self, rewards: Sequence[str], aggregator: str = "syn_pic", min_candidates: int = 2):
        super().__init__()
        self.rewards, self.aggregator, self.min_candidates = list(rewards), aggregator, min_candidates

    def expand(self, inputs):
        prompts, scored = inputs
        keyed_prompts = prompts | "KeyPrompts" >> beam.Map(lambda p: (p.prompt_id, p))
        grouped = {"prompt": keyed_prompts, "candidates": scored} | "GroupByPrompt" >> beam.CoGroupByKey()
        out = grouped | "SynPicLabels" >> beam.ParDo(
            _RankGroup(self.rewards, self.aggregator, self.min_candidates)).with_outputs(DROPPED, main="groups")
        return {"groups": out.groups, "dropped": out[DROPPED]}
