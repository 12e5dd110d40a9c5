"""Noisy-pair filtering: keep pairs the reward ensemble agrees on (PAPER_NOTES s.1)."""
from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Union

import apache_beam as beam

from synpref.schemas.config import FilterConfig
from synpref.schemas.records import Drop, PreferencePair, RankedGroup

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
    if pair.n_rewards:
        agreement = Fraction(pair.wins, pair.n_rewards)
        unanimous = pair.wins == pair.n_rewards
    else:  # a pair built without counts (older callers): fall back to the float
        agreement, unanimous = Fraction(pair.agreement), pair.agreement >= 1.0
    if agreement - Fraction(1, 2) <= Fraction(str(cfg.min_agreement_margin)):
        return False, "low_agreement"
    if cfg.require_unanimous and not unanimous:
        return False, "not_unanimous"
    return True


class _FilterPairs(beam.DoFn):
    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg

    def process(self, group: RankedGroup):
        kept = []
        for pair in group.pairs:
            verdict = keep_pair(pair, self.cfg)
            if verdict is True:
                kept.append(pair)
            else:
                yield beam.pvalue.TaggedOutput(DROPPED, Drop(
                    "pair", verdict[1], pair.key, "filter",
                    f"agreement={pair.agreement:.3f} gap={abs(pair.phi_winner - pair.phi_loser):.4f}"))
        yield dataclasses.replace(group, pairs=tuple(kept))


class FilterPairs(beam.PTransform):
    """RankedGroup -> RankedGroup with only the kept pairs; removed pairs go to drops with their reason."""

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, groups):
        out = groups | "KeepAgreedPairs" >> beam.ParDo(_FilterPairs(self.cfg)).with_outputs(DROPPED, main="groups")
        return {"groups": out.groups, "dropped": out[DROPPED]}
