"""Count what entered, what was written and what was dropped (by level and reason); write the manifest.

The manifest is the job's ledger: for prompts, candidates and pairs,
``in == written + sum(dropped)``, and ``balanced`` says whether that holds.
"""
from __future__ import annotations

import json
from typing import Any

import apache_beam as beam

from synpref.transforms.dataset_card import dataset_card
from synpref.transforms.fileio import AtomicFile


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


def ledger(counts: dict[str, int], drops: dict[str, int], per_prompt: int) -> dict[str, Any]:
    """Assemble per-level counts; ``drops`` is keyed ``level:reason``."""
    by_level: dict[str, dict[str, int]] = {"prompt": {}, "candidate": {}, "pair": {}}
    for key, n in sorted(drops.items()):
        level, reason = key.split(":", 1)
        by_level.setdefault(level, {})[reason] = n

    def level(entered: int, written: int, name: str) -> dict[str, Any]:
        dropped = by_level.get(name, {})
        return {"in": entered, "written": written, "dropped": dropped,
                "dropped_total": sum(dropped.values()), "balanced": entered == written + sum(dropped.values())}

    kept = counts.get("prompts_kept", 0)
    return {
        "prompts": level(counts.get("prompts_read", 0), counts.get("groups_written", 0), "prompt"),
        "candidates": level(kept * per_prompt, counts.get("images_written", 0), "candidate"),
        "pairs": level(counts.get("pairs_considered", 0), counts.get("pairs_written", 0), "pair"),
    }


class _WriteManifest(beam.DoFn):
    def __init__(self, path: str, header: dict[str, Any], per_prompt: int):
        self.path, self.header, self.per_prompt = path, header, per_prompt

    def process(self, _, counts: dict, drops: dict, shards: list, dead_letter_files: list):
        counts = dict(counts)
        counts["groups_written"] = sum(s["groups"] for s in shards)
        counts["images_written"] = sum(s["images"] for s in shards)
        counts["pairs_written"] = sum(s["pairs"] for s in shards)
        manifest = {**self.header, "counts": ledger(counts, dict(drops), self.per_prompt),
                    "shards": sorted(shards, key=lambda s: s["shard"]),
                    "dead_letter_files": sorted(dead_letter_files)}
        with AtomicFile(self.path.rsplit("/", 1)[0] + "/README.md") as f:
            f.write(dataset_card(manifest).encode())
        with AtomicFile(self.path) as f:  # last: a manifest on disk means the build finished
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        yield manifest


class WriteManifest(beam.PTransform):
    """(counts, drops, shard stats, dead-letter files) -> manifest.json, written last.

    Taking the shard stats and the dead-letter file names as side inputs makes the
    manifest wait for both writes: a manifest on disk means the build finished.
    """

    def __init__(self, path: str, header: dict[str, Any], per_prompt: int):
        super().__init__()
        self.path, self.header, self.per_prompt = path, header, per_prompt

    def expand(self, inputs):
        counts, drops, shards, dead_letter_files = inputs
        drop_counts = (drops
                       | "DropKey" >> beam.Map(lambda d: (f"{d.level}:{d.reason}", 1))
                       | "CountDrops" >> beam.CombinePerKey(sum))
        return (counts.pipeline
                | "Once" >> beam.Create([None])
                | "Write" >> beam.ParDo(_WriteManifest(self.path, self.header, self.per_prompt),
                                        beam.pvalue.AsDict(counts), beam.pvalue.AsDict(drop_counts),
                                        beam.pvalue.AsList(shards), beam.pvalue.AsList(dead_letter_files)))


class WriteDeadLetters(beam.PTransform):
    """Every Drop as one JSON line under ``<output>/dead_letter/``."""

    def __init__(self, output_dir: str):
        super().__init__()
        self.prefix = output_dir.rstrip("/") + "/dead_letter/drops"

    def expand(self, drops):
        return (drops
                | "ToJson" >> beam.Map(lambda d: json.dumps(d.to_dict(), sort_keys=True))
                | "Write" >> beam.io.WriteToText(self.prefix, file_name_suffix=".jsonl", num_shards=1))
