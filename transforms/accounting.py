"""Count what entered, what was written and what was dropped (by level and reason); write the manifest
(and, for a build, the dataset card beside it).

The manifest is the job's ledger. Each pipeline declares its levels (the build: prompts, candidates and
pairs; the corpus filter: samples); for each, ``in == written + sum(dropped)``, and ``balanced`` says
whether that holds. Both pipelines count ``Drop`` records with ``CountDrops`` and write them with
``Drop.to_json`` (one dead-letter schema).
"""
from __future__ import annotations

import logging
from typing import Any

import apache_beam as beam

from ..core.fileio import AtomicFile, dumps_strict
from .dataset_card import dataset_card

log = logging.getLogger("synpref.build")

# Reasons that mean a model failed on an item (as opposed to a deliberate filter decision).
ERROR_REASONS = ("generation_error", "nan_image", "scoring_error", "nan_score")
class CountAs(beam.PTransform):
    """PCollection -> one (name, count) element (0 for an empty input)."""

    def __init__(self, name: str, weight=None):
        super().__init__()
        self.name, self.weight = name, weight

    def expand(self, pcoll):
        name, weight = self.name, self.weight
        values = pcoll | "Weigh" >> beam.Map(weight) if weight else pcoll | "One" >> beam.Map(lambda _: 1)
        return (values | "Sum" >> beam.CombineGlobally(sum).without_defaults()
                | "Name" >> beam.Map(lambda n: (name, n)))


BUILD_LEVELS = (("prompts", "prompt"), ("candidates", "candidate"), ("pairs", "pair"))


def ledger(levels, entered: dict[str, int], written: dict[str, int], drops: dict[str, int]) -> dict[str, Any]:
    """The manifest's ``counts``: ``{name: {in, written, dropped, dropped_total, balanced}}`` per level.

    ``levels``: the pipeline's ``(manifest name, Drop.level)`` pairs, in order; ``entered`` and ``written``
    are keyed by manifest name, ``drops`` by ``level:reason``. A drop at a level the pipeline did not
    declare gets an entry of its own (in 0), which cannot balance: nothing is silently left out.
    """
    by_level: dict[str, dict[str, int]] = {}
    for key, n in sorted(drops.items()):
        level, reason = key.split(":", 1)
        by_level.setdefault(level, {})[reason] = n
    declared = dict(levels)
    names = list(declared) + [lvl for lvl in by_level if lvl not in declared.values()]
    out = {}
    for name in names:
        dropped = by_level.get(declared.get(name, name), {})
        n_in, n_written = entered.get(name, 0), written.get(name, 0)
        out[name] = {"in": n_in, "written": n_written, "dropped": dropped, "dropped_total": sum(dropped.values()),
                     "balanced": n_in == n_written + sum(dropped.values())}
    return out


def build_ledger(counts: dict[str, int], drops: dict[str, int], per_prompt: int) -> dict[str, Any]:
    """The build's ledger from its named counters (every kept prompt enters ``per_prompt`` candidates)."""
    entered = {"prompts": counts.get("prompts_read", 0),
               "candidates": counts.get("prompts_kept", 0) * per_prompt,
               "pairs": counts.get("pairs_considered", 0)}
    written = {"prompts": counts.get("groups_written", 0), "candidates": counts.get("images_written", 0),
               "pairs": counts.get("pairs_written", 0)}
    return ledger(BUILD_LEVELS, entered, written, drops)


class CountDrops(beam.PTransform):
    """Drop records -> ``("level:reason", count)``, the ``drops`` argument of ``ledger``."""

    def expand(self, drops):
        return (drops
                | "DropKey" >> beam.Map(lambda d: (f"{d.level}:{d.reason}", 1))
                | "CountDrops" >> beam.CombinePerKey(sum))


class _WriteManifest(beam.DoFn):
    def __init__(self, path: str, header: dict[str, Any], per_prompt: int):
        self.path, self.header, self.per_prompt = path, header, per_prompt

    def process(self, _, counts: dict, drops: dict, errors: dict, shards: list, dead_letter_files: list,
                ranking: list):
        counts = dict(counts)
        counts["groups_written"] = sum(s["groups"] for s in shards)
        counts["images_written"] = sum(s["images"] for s in shards)
        counts["pairs_written"] = sum(s["pairs"] for s in shards)
        manifest = {**self.header, "counts": build_ledger(counts, dict(drops), self.per_prompt),
                    "errors_by_stage": {stage: {"count": n, "first": first}
                                        for stage, (n, first) in sorted(errors.items())},
                    "shards": sorted(shards, key=lambda s: s["shard"]),
                    "dead_letter_files": sorted(dead_letter_files),
                    # the aggregator's dataset statistics or estimated reward weights, when it has any
                    "ranking": ranking[0] if ranking else {}}
        with AtomicFile(self.path.rsplit("/", 1)[0] + "/README.md") as f:
            f.write(dataset_card(manifest).encode())
        with AtomicFile(self.path) as f:  # last: a manifest on disk means the build finished
            f.write(dumps_strict(manifest, indent=2, sort_keys=True).encode())
        yield manifest


FILTER_LEVELS = (("samples", "sample"),)  # the filter's ledger: every input sample is written or dropped


class WriteFilterManifest(beam.DoFn):
    """The corpus filter's manifest, from its side inputs (read counts, drops, shards, per-shard outcomes)."""

    def __init__(self, path: str, header: dict[str, Any]):
        self.path, self.header = path, header

    def process(self, _, read: list, drops: dict, shards: list, outcomes: list, cutoff, sizes_files: list = ()):
        shards = sorted(shards, key=lambda s: s["shard"])
        counts = ledger(FILTER_LEVELS, {"samples": sum(read)}, {"samples": sum(s["samples"] for s in shards)},
                        drops)
        manifest = {**self.header, "counts": counts, "shards": shards,
                    "index_files": sorted(o["index"] for o in outcomes),
                    "dead_letter_files": sorted(o["dead_letter"] for o in outcomes),
                    "top_fraction_cutoff": cutoff, **({"sizes_file": sizes_files[0]} if sizes_files else {})}
        with AtomicFile(self.path) as f:  # last: a manifest on disk means the run finished
            f.write(dumps_strict(manifest, indent=2, sort_keys=True).encode())
        yield manifest


def _count_and_first(values) -> tuple[int, str]:
    """(number of errors, the smallest detail line): a deterministic example for the summary."""
    n, first = 0, None
    for count, detail in values:
        n += count
        first = detail if first is None else min(first, detail)
    return n, first or ""


class WriteManifest(beam.PTransform):
    """(counts, drops, shard stats, dead-letter files, ranking stats) -> manifest.json, written last.

    Taking the shard stats and the dead-letter file names as side inputs makes the
    manifest wait for both writes: a manifest on disk means the build finished.
    """

    def __init__(self, path: str, header: dict[str, Any], per_prompt: int):
        super().__init__()
        self.path, self.header, self.per_prompt = path, header, per_prompt

    def expand(self, inputs):
        counts, drops, shards, dead_letter_files, ranking = inputs
        drop_counts = drops | CountDrops()
        errors = (drops
                  | "ModelErrors" >> beam.Filter(lambda d: d.reason in ERROR_REASONS)
                  | "ByStage" >> beam.Map(lambda d: (d.stage, (1, f"{d.reason}: {d.record_id}: {d.detail}")))
                  | "CountAndFirst" >> beam.CombinePerKey(_count_and_first))
        return (counts.pipeline
                | "Once" >> beam.Create([None])
                | "Write" >> beam.ParDo(_WriteManifest(self.path, self.header, self.per_prompt),
                                        beam.pvalue.AsDict(counts), beam.pvalue.AsDict(drop_counts),
                                        beam.pvalue.AsDict(errors), beam.pvalue.AsList(shards),
                                        beam.pvalue.AsList(dead_letter_files), beam.pvalue.AsList(ranking)))


class WriteDeadLetters(beam.PTransform):
    """Every Drop as one JSON line under ``<output>/dead_letter/``."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.prefix = output_dir.rstrip("/") + "/dead_letter/drops"

    def expand(self, drops):
        return (drops
                | "ToJson" >> beam.Map(lambda d: d.to_json())
                | "Write" >> beam.io.WriteToText(self.prefix, file_name_suffix=".jsonl", num_shards=1))
