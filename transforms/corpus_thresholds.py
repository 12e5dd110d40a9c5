"""Keep corpus records by their scores: per-reward ``min``/``max`` thresholds and a top fraction by one score
(a global quantile from ``ApproximateQuantiles``: a fixed-size summary, never all scores), combined with
``and``/``or``."""
from __future__ import annotations

from typing import Optional

import apache_beam as beam

from ..schemas.records import CorpusRecord
from .corpus_scoring import DROPPED


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def judge(rec: CorpusRecord, thresholds, top, cutoff: Optional[float], mode: str):
    """(passes, reason, detail) of one record under the thresholds and the top-fraction cutoff."""
    failures = []
    for t in thresholds:
        reason, detail = t.violation(rec.scores[t.reward])
        failures.append((reason, detail) if reason else None)
    if top is not None:
        s = rec.scores[top.reward]
        if cutoff is None or s < cutoff:
            failures.append(("not_top_fraction", f"{top.reward} {_fmt(s)} < {1 - top.fraction:.4g} quantile "
                                                 f"{_fmt(cutoff) if cutoff is not None else 'n/a'}"))
        else:
            failures.append(None)
    if not failures:
        return True, "", ""
    passes = all(f is None for f in failures) if mode == "and" else any(f is None for f in failures)
    if passes:
        return True, "", ""
    first = next(f for f in failures if f is not None)
    return False, first[0], first[1]


def quantile_cutoff(quantiles: list, fraction: float) -> Optional[float]:
    """The (1 - fraction) quantile from ApproximateQuantiles' evenly spaced list (None if empty)."""
    if not quantiles:
        return None
    i = int(round((1.0 - fraction) * (len(quantiles) - 1)))
    return float(quantiles[min(max(i, 0), len(quantiles) - 1)])


class ApplyFilters(beam.PTransform):
    """CorpusRecord -> kept records (main ``kept``) and dropped ones (``dropped``); plus the cutoff used."""

    def __init__(self, thresholds, top_fraction, mode: str):
        super().__init__()
        self.thresholds, self.top, self.mode = tuple(thresholds), top_fraction, mode

    def expand(self, records):
        thresholds, top, mode = self.thresholds, self.top, self.mode
        if top is not None:
            quantiles = (records
                         | "TopScore" >> beam.Map(lambda r: r.scores[top.reward])
                         | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(top.num_quantiles))
            cutoff = quantiles | "Cutoff" >> beam.Map(quantile_cutoff, top.fraction)
        else:
            cutoff = records.pipeline | "NoCutoff" >> beam.Create([None])

        def apply(rec, cut):
            ok, reason, detail = judge(rec, thresholds, top, cut, mode)
            if ok:
                yield rec
            else:
                yield beam.pvalue.TaggedOutput(DROPPED, rec.drop(reason, "filter", detail))

        out = records | "Judge" >> beam.FlatMap(apply, beam.pvalue.AsSingleton(cutoff, default_value=None)) \
            .with_outputs(DROPPED, main="kept")
        return {"kept": out.kept, "dropped": out[DROPPED], "cutoff": cutoff}
