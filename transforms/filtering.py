"""Noisy-pair filtering: keep pairs the reward ensemble agrees on (PAPER_NOTES s.1)."""
from __future__ import annotations

import dataclasses
from typing import Union

import apache_beam as beam

from synpref.schemas.config import FilterConfig
from synpref.schemas.records import Drop, PreferencePair, RankedGroup

DROPPED = "dropped"


def keep_pair(pair: PreferencePair, cfg: FilterConfig) -> Union[bool, tuple[bool, str]]:
    """True, or (False, reason). Reasons: tied_phi, low_agreement, not_unanimous."""
    if pair.phi_winner == pair.phi_loser:
        return False, "tied_phi"
    if pair.agreement - 0.5 <= cfg.min_agreement_margin:
        return False, "low_agreement"
    if cfg.require_unanimous and pair.agreement < 1.0:
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
                    "pair", verdict[1], pair.key, "filter", f"agreement={pair.agreement:.3f}"))
        yield dataclasses.replace(group, pairs=tuple(kept))


class FilterPairs(beam.PTransform):
    """RankedGroup -> RankedGroup with only the kept pairs; removed pairs go to drops with their reason."""

    def __init__(self, cfg: FilterConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, groups):
        out = groups | "KeepAgreedPairs" >> beam.ParDo(_FilterPairs(self.cfg)).with_outputs(DROPPED, main="groups")
        return {"groups": out.groups, "dropped": out[DROPPED]}
