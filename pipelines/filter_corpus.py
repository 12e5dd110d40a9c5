"""Filter a web image-text corpus with synpref's rewards: shards -> scores -> dedup -> filters -> shards + ledger.

    synpref filter --config jobs/demo_filter.yaml [--set k=v] [beam flags]

```
ListShards -> ScoreShards -> DedupKeys -> DedupExact [-> DedupNear] -> ApplyFilters -> WriteFiltered ------------\
                  \______________ every drop, with its reason ____\-> WriteOutcomes --> WriteManifest
```
Pixels exist only inside ``ScoreShards``; later steps carry key, caption, metadata, scores and the image's
location in its source tar, and the writer copies the original bytes from there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from typing import Any, Optional

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

import synpref
from synpref import progress
from synpref.schemas.filter_config import FilterJobConfig, filter_config_to_dict, load_filter_config
from synpref.transforms.accounting import CountDrops, ledger
from synpref.transforms.corpus_dedup import DedupExact, DedupKeys, DedupNear
from synpref.transforms.corpus_scoring import DROPPED, ScoreCorpus
from synpref.transforms.corpus_thresholds import ApplyFilters
from synpref.transforms.corpus_writing import WriteFiltered, WriteOutcomes
from synpref.transforms.corpus_sources import corpus_input_from_config
from synpref.transforms.fileio import AtomicFile
from synpref.transforms.rewards import create_reward

log = logging.getLogger("synpref.filter")
FILTER_LEVELS = (("samples", "sample"),)  # the filter's ledger: every input sample is written or dropped
_OUR_FILES = {"shards": re.compile(r"^filtered-\d{5,}(-\d{5,})?\.tar(\.tmp)?$"),
              "index": re.compile(r"^samples-\d{5}\.parquet(\.tmp)?$"),
              "dead_letter": re.compile(r"^drops-\d{5}\.jsonl(\.tmp)?$")}


def preflight_filter(cfg: FilterJobConfig) -> list[str]:
    """The input units (raises FileNotFoundError if a source has none, ValueError if the first Parquet table
    lacks the configured columns) after checking the output is writable."""
    corpus_input = corpus_input_from_config(cfg.input)
    shards = corpus_input.list_units(cfg.input.source)
    corpus_input.check(shards)
    out = cfg.output.output_dir.rstrip("/")
    fs, path = fsspec.core.url_to_fs(out)
    try:
        fs.makedirs(path, exist_ok=True)
        probe = f"{path}/.synpref_write_test"
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except OSError as e:
        raise ValueError(f"output.output_dir {out!r} is not writable: {e}") from None
    return shards


def remove_stale_files(output_dir: str, written: set[str]) -> list[str]:
    """Delete our shard/index/dead-letter files that this run did not write (an earlier, larger run)."""
    fs, root = fsspec.core.url_to_fs(output_dir.rstrip("/"))
    keep = {fsspec.core.url_to_fs(p)[1] for p in written}
    removed = []
    for sub, pattern in _OUR_FILES.items():
        for path in fs.glob(f"{root}/{sub}/*"):
            if pattern.match(path.rsplit("/", 1)[-1]) and path not in keep:
                fs.rm(path)
                removed.append(path)
    return removed


class _WriteManifest(beam.DoFn):
    def __init__(self, path: str, header: dict[str, Any]):
        self.path, self.header = path, header

    def process(self, _, read: list, drops: dict, shards: list, outcomes: list, cutoff):
        shards = sorted(shards, key=lambda s: s["shard"])
        counts = ledger(FILTER_LEVELS, {"samples": sum(read)}, {"samples": sum(s["samples"] for s in shards)},
                        drops)
        files = {s["tar"] for s in shards} | {o["index"] for o in outcomes} | {o["dead_letter"] for o in outcomes}
        root = self.path.rsplit("/", 1)[0]
        remove_stale_files(root, {f"{root}/{f}" for f in files})  # manifest paths are relative to the output
        manifest = {**self.header, "counts": counts, "shards": shards,
                    "index_files": sorted(o["index"] for o in outcomes),
                    "dead_letter_files": sorted(o["dead_letter"] for o in outcomes),
                    "top_fraction_cutoff": cutoff}
        with AtomicFile(self.path) as f:  # last: a manifest on disk means the run finished
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        yield manifest


class FilterCorpus(beam.PTransform):
    """The whole filter job as one composite; ``expand`` is the diagram in the module docstring."""

    def __init__(self, cfg: FilterJobConfig, shards: list[str], header: dict[str, Any]):
        super().__init__()
        self.cfg, self.shards, self.header = cfg, shards, header

    def expand(self, pbegin):
        cfg, out = self.cfg, self.cfg.output.output_dir.rstrip("/")
        names = [r.name for r in cfg.rewards]
        corpus_input = corpus_input_from_config(cfg.input)
        scored = (pbegin
                  | "ListShards" >> beam.Create(list(enumerate(self.shards)))
                  | "SpreadShards" >> beam.Reshuffle()
                  | "ScoreShards" >> ScoreCorpus(
                      cfg.rewards, corpus_input, max_pixels=cfg.input.max_pixels, batch_size=cfg.input.batch_size,
                      max_caption_chars=cfg.input.max_caption_chars, torch_threads=cfg.torch_threads,
                      perceptual_hash=cfg.filter.near_duplicate_distance >= 0, jpeg_draft=cfg.input.jpeg_draft,
                      total_shards=len(self.shards), cache_dir=f"{out}/_cache"))
        drops = [scored["dropped"]]
        keys = scored["scored"] | "DedupKeys" >> DedupKeys()
        drops.append(keys[DROPPED])
        records = keys.kept
        if cfg.filter.dedup == "exact":
            deduped = records | "DedupExact" >> DedupExact()
            drops.append(deduped[DROPPED])
            records = deduped.kept
        if cfg.filter.near_duplicate_distance >= 0:
            near = records | "DedupNear" >> DedupNear(cfg.filter.near_duplicate_distance)
            drops.append(near[DROPPED])
            records = near.kept
        filtered = records | "ApplyFilters" >> ApplyFilters(cfg.filter.thresholds, cfg.filter.top_fraction,
                                                            cfg.filter.mode)
        drops.append(filtered["dropped"])
        kept = filtered["kept"]
        shards = kept | "WriteFiltered" >> WriteFiltered(out, cfg.output.samples_per_shard, corpus_input)
        dropped = drops | "AllDrops" >> beam.Flatten()
        outcomes = (dropped, kept) | "AllOutcomes" >> beam.Flatten() | "WriteOutcomes" >> WriteOutcomes(out, names)
        drop_counts = dropped | "TheirDrops" >> beam.Map(lambda r: r.dropped) | CountDrops()
        return (pbegin
                | "Once" >> beam.Create([None])
                | "WriteManifest" >> beam.ParDo(
                    _WriteManifest(f"{out}/manifest.json", self.header),
                    beam.pvalue.AsList(scored["read"]), beam.pvalue.AsDict(drop_counts),
                    beam.pvalue.AsList(shards), beam.pvalue.AsList(outcomes),
                    beam.pvalue.AsSingleton(filtered["cutoff"], default_value=None)))


def manifest_header(cfg: FilterJobConfig, shards: list[str]) -> dict[str, Any]:
    config = filter_config_to_dict(cfg)
    config.pop("beam_options")
    config["output"].pop("output_dir")
    rewards = [create_reward(r.name, r.params).describe() for r in cfg.rewards]
    return {
        "synpref_version": synpref.__version__,
        "job": "filter",
        "input_shards": shards,
        "layout": {
            "shards": "shards/filtered-{n}-{k}.tar: the kept samples of input shard n in input order, "
                      "samples_per_shard per tar; original keys, image and .txt bytes; json = the "
                      "original metadata + synpref_scores + synpref_source",
            "index": "index/samples-{n}.parquet: every sample of input shard n: key, scores, kept, reason",
            "dead_letter": "dead_letter/drops-{n}.jsonl: every dropped sample of input shard n, with reason",
        },
        "rewards": rewards,
        "config_fingerprint": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "config": config,
    }


def filter_corpus(cfg: FilterJobConfig, pipeline_args: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the filter job; returns the manifest and a run summary (also written to run_summary.json)."""
    out = cfg.output.output_dir.rstrip("/")
    shards = preflight_filter(cfg)
    fs, manifest_path = fsspec.core.url_to_fs(f"{out}/manifest.json")
    if fs.exists(manifest_path):
        fs.rm(manifest_path)  # while files are rewritten, nothing claims they are done
    options = PipelineOptions(list(cfg.beam_options) + list(pipeline_args or []), save_main_session=False)
    progress.reset()  # in-process runners share trackers: start each job's counts at zero
    start = time.monotonic()
    p = beam.Pipeline(options=options)
    _ = p | "FilterCorpus" >> FilterCorpus(cfg, shards, manifest_header(cfg, shards))
    p.run().wait_until_finish()
    with fsspec.open(f"{out}/manifest.json", "r") as f:
        manifest = json.load(f)
    summary = {"wall_seconds": round(time.monotonic() - start, 2), "counts": manifest["counts"],
               "problems": filter_problems(manifest),
               "manifest": f"{out}/manifest.json"}
    with fsspec.open(f"{out}/run_summary.json", "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return {"manifest": manifest, "summary": summary}


def filter_problems(manifest: dict[str, Any]) -> list[str]:
    """Why this run should not count as a success (empty = it should): an unbalanced ledger (any level),
    or samples lost to scoring errors or unreadable shards (each one is in dead_letter/)."""
    counts = manifest["counts"]
    problems = [f"ledger does not balance for {name}: in {c['in']} != written {c['written']} + dropped "
                f"{c['dropped_total']}" for name, c in counts.items() if not c["balanced"]]
    dropped = counts.get("samples", {}).get("dropped", {})
    errors = sum(n for r, n in dropped.items() if r in ("scoring_error", "unreadable_shard"))
    if errors:
        problems.append(f"{errors} sample(s) lost to scoring errors or unreadable shards: see dead_letter/")
    return problems


def format_summary(result: dict[str, Any]) -> str:
    m, s = result["manifest"], result["summary"]
    c = m["counts"]["samples"]
    reasons = ", ".join(f"{k}={v}" for k, v in c["dropped"].items()) or "none"
    balanced = all(level["balanced"] for level in m["counts"].values())
    lines = ["== synpref filter: " + ("FAILED ==" if s["problems"] else "done =="),
             f"samples     in {c['in']}  written {c['written']}  dropped {c['dropped_total']} ({reasons})",
             "ledger      " + ("balanced: every sample written or dropped with a reason" if balanced
                               else "NOT balanced: see dead_letter/ and report a bug"),
             f"time        wall {s['wall_seconds']}s",
             f"shards      {len(m['shards'])} under {s['manifest'].rsplit('/', 1)[0]}/shards",
             f"manifest    {s['manifest']}"]
    lines += [f"PROBLEM     {p}" for p in s["problems"]]
    return "\n".join(lines)


def run(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args, rest = parser.parse_known_args(argv)
    return filter_corpus(load_filter_config(args.config, args.set), rest)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print(format_summary(run()))
