"""Noisy-pair filtering: keep pairs the reward ensemble agrees on (arXiv 2410.18013 Alg. 1; docs/math.md s.1)."""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Union

import apache_beam as beam

from ..schemas.config import FilterConfig
from ..schemas.records import Drop, PreferencePair, RankedGroup
from .perceptual_hash import dhash, hamming

DROPPED = "dropped"


def keep_pair(pair: PreferencePair, cfg: FilterConfig) -> Union[bool, tuple[bool, str]]:
    """True, or (False, reason). Rules, in this order (the first that fails names the reason):

    * ``tied_phi``: equal labels, no preference;
    * ``small_gap``: phi_winner - phi_loser < ``min_aggregate_gap`` (off at 0);
    * ``low_agreement``: agreement - 1/2 <= ``min_agreement_margin``;
    * ``not_unanimous`` (with ``require_unanimous``): agreement < 1, i.e. some reward with a
      positive weight does not score the winner strictly higher.

    Agreement is the (weighted) fraction of rewards preferring the winner, compared as the exact
    fraction ``wins / n_rewards`` (integer votes, or the exact weighted fraction: see
    ``ranking.rank_candidates``): in floats 0.8 - 0.5 is 0.30000000000000004, which would keep a
    4-of-5 pair at margin 0.3. The gap compares labels that are floats already; its threshold is
    read as the float it is.
    """
    if pair.phi_winner == pair.phi_loser:
        return False, "tied_phi"
    if cfg.min_aggregate_gap and abs(pair.phi_winner - pair.phi_loser) < cfg.min_aggregate_gap:
        return False, "small_gap"
    agreement = Fraction(pair.wins, pair.n_rewards)
    unanimous = pair.wins == pair.n_rewards
    if agreement - Fraction(1, 2) <= Fraction(str(cfg.min_agreement_margin)):
        return False, "low_agreement"
    if cfg.require_unanimous and not unanimous:
        return False, "not_unanimous"
    return True


def select_pair(pair: PreferencePair, ranks: dict[str, int], n: int, cfg: FilterConfig) -> bool:
    """Whether a pair that passed ``keep_pair`` is kept by ``cfg.pair_selection``.

    ``ranks`` maps candidate id -> rank (1 = best) and ``n`` is the group's candidate count, so the
    worst rank is ``n``. ``best_worst``: the pair (rank 1, rank n) only. ``top_bottom``: winner rank
    <= k and loser rank > n - k (k = ``top_bottom_k``; with 2k > n the two sets overlap, and a pair
    is still winner-first, so it is kept when both conditions hold).
    """
    mode = getattr(cfg, "pair_selection", "all")
    if mode == "all":
        return True
    w, l = ranks[pair.winner_id], ranks[pair.loser_id]
    if mode == "best_worst":
        return w == 1 and l == n
    if mode == "top_bottom":
        k = cfg.top_bottom_k
        return w <= k and l > n - k
    raise ValueError(f"unknown filter.pair_selection {mode!r}")


def _group_hashes(group: RankedGroup) -> dict[str, int]:
    """Each candidate's difference hash: the one the scoring step stored, else from the staged image."""
    from .staging import load_staged_image

    return {c.candidate_id: int(c.dhash, 16) if c.dhash else dhash(load_staged_image(c.image_uri))
            for c in group.candidates}


class _FilterPairs(beam.DoFn):
    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def process(self, group: RankedGroup):
        kept = []
        ranks = {c.candidate_id: c.rank for c in group.candidates}
        n = len(group.candidates)
        near = getattr(self.cfg, "near_duplicate_distance", None)
        hashes = _group_hashes(group) if near is not None and group.pairs else {}
        for pair in group.pairs:
            verdict = keep_pair(pair, self.cfg)
            detail = f"agreement={pair.agreement:.3f} gap={abs(pair.phi_winner - pair.phi_loser):.4f}"
            if verdict is not True:
                yield beam.pvalue.TaggedOutput(DROPPED, Drop("pair", verdict[1], pair.key, "filter", detail))
            elif hashes and hamming(hashes[pair.winner_id], hashes[pair.loser_id]) <= near:
                yield beam.pvalue.TaggedOutput(DROPPED, Drop(
                    "pair", "near_duplicate_pair", pair.key, "filter",
                    f"dhash distance {hamming(hashes[pair.winner_id], hashes[pair.loser_id])} <= {near}"))
            elif not select_pair(pair, ranks, n, self.cfg):
                yield beam.pvalue.TaggedOutput(DROPPED, Drop(
                    "pair", "not_selected", pair.key, "filter",
                    f"{self.cfg.pair_selection}: ranks {ranks[pair.winner_id]}>{ranks[pair.loser_id]} of {n}"))
            else:
                kept.append(pair)
        yield dataclasses.replace(group, pairs=tuple(kept))


class FilterPairs(beam.PTransform):
    """RankedGroup -> RankedGroup with only the kept pairs; removed pairs go to drops with their reason.

    Per pair, in order: ``keep_pair`` (noise), then near-duplicate images (``near_duplicate_pair``,
    with ``near_duplicate_distance``: reads each staged image of the group once), then
    ``pair_selection`` (``not_selected``). The ranked layout is unchanged: it keeps every candidate.
    """

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, groups):
        out = groups | "KeepAgreedPairs" >> beam.ParDo(_FilterPairs(self.cfg)).with_outputs(DROPPED, main="groups")
        return {"groups": out.groups, "dropped": out[DROPPED]}
