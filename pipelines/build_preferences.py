"""The build pipeline: prompts -> candidates -> rewards -> Syn-Pic ranks -> filtered pairs -> shards + manifest.

    python -m synpref.pipelines.build_preferences --config jobs/demo_build.yaml [--set k=v] [beam flags]

Beam flags (``--runner``, ``--setup_file``, ``--direct_running_mode``...) pass
through unchanged, so the same job runs on the DirectRunner, Dataflow, Flink or Spark.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any, Optional

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

import synpref
from synpref import progress
from synpref.schemas.config import BuildConfig, config_to_dict, load_build_config
from synpref.transforms.accounting import CountAs, WriteDeadLetters, WriteManifest
from synpref.transforms.filtering import FilterPairs
from synpref.transforms.generation import GenerateCandidates
from synpref.transforms.model_io import check_location
from synpref.transforms.prompts import ReadPrompts
from synpref.transforms.ranking import RankGroups
from synpref.transforms.rewards import create_reward
from synpref.transforms.scoring import ScoreCandidates
from synpref.transforms.writing import WriteShards

log = logging.getLogger("synpref.build")


def manifest_header(cfg: BuildConfig) -> dict[str, Any]:
    return {
        "synpref_version": synpref.__version__,
        "output_dir": cfg.output.output_dir,
        "layout": {
            "ranked": "ranked/ranked-{shard}.tar: key=prompt_id; img0.png..img{k-1}.png in rank order; json labels",
            "pairs": "pairs/pairs-{shard}.tar: key=<winner>__<loser>; win.png, lose.png, json",
            "index": "<tar name>.parquet beside each tar",
            "dead_letter": "dead_letter/drops-*.jsonl",
        },
        "aggregator": cfg.ranking.aggregator,
        "max_candidates": len(cfg.generators) * cfg.candidates_per_generator,
        "rewards": [create_reward(r.name, r.params).describe() for r in cfg.rewards],
        "generators": [config_to_dict(g) for g in cfg.generators],
        "config": config_to_dict(cfg),
    }


class BuildPreferences(beam.PTransform):
    """The whole build as one composite; ``expand`` is the pipeline diagram."""

    def __init__(self, cfg: BuildConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, pbegin):
        cfg = self.cfg
        out = cfg.output.output_dir
        per_prompt = len(cfg.generators) * cfg.candidates_per_generator
        n = cfg.prompts.num_prompts

        prompts = pbegin | "ReadPrompts" >> ReadPrompts(cfg.prompts, cfg.seed)
        generated = prompts["prompts"] | "GenerateCandidates" >> GenerateCandidates(
            cfg.generators, cfg.candidates_per_generator, cfg.seed, cfg.staging_dir, expected_prompts=n,
            torch_threads=cfg.torch_threads)
        scored = generated["units"] | "ScoreCandidates" >> ScoreCandidates(
            cfg.rewards, expected_images=None if n is None else n * per_prompt, torch_threads=cfg.torch_threads)
        ranked = (prompts["prompts"], scored["scored"]) | "RankCandidates" >> RankGroups(
            [r.name for r in cfg.rewards], cfg.ranking.aggregator, cfg.filter.min_candidates)
        filtered = ranked["groups"] | "FilterNoisyPairs" >> FilterPairs(cfg.filter)
        shards = filtered["groups"] | "WriteShards" >> WriteShards(out, cfg.output.samples_per_shard, n)

        drops = [s["dropped"] for s in (prompts, generated, scored, ranked, filtered)] | "AllDrops" >> beam.Flatten()
        dead_letter_files = drops | "DeadLetters" >> WriteDeadLetters(out)
        counts = [
            prompts["read"] | "CountRead" >> CountAs("prompts_read"),
            prompts["prompts"] | "CountKept" >> CountAs("prompts_kept"),
            ranked["groups"] | "CountPairs" >> CountAs("pairs_considered", lambda g: len(g.pairs)),
        ] | "AllCounts" >> beam.Flatten()
        return (counts, drops, shards, dead_letter_files) | "WriteManifest" >> WriteManifest(
            f"{out.rstrip('/')}/manifest.json", manifest_header(cfg), per_prompt)


def _synpref_counters(result) -> dict[str, int]:
    """synpref's Beam counters summed over steps and workers; empty if the runner reports none."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners do not report metrics to the launcher
        return {}
    totals: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace == "synpref":
            name = c.key.metric.name
            totals[name] = totals.get(name, 0) + (c.committed or c.attempted or 0)
    return totals


def preflight(cfg: BuildConfig) -> None:
    """Check every model location the job names, so a typo fails now and not on a worker an hour in."""
    for g in cfg.generators:
        check_location(g.model, f"generator {g.id}: model")
    for r in cfg.rewards:
        for key in ("checkpoint", "model_config"):
            check_location(str(r.params.get(key, "")), f"reward {r.name}: {key}")


def build(cfg: BuildConfig, pipeline_args: Optional[list[str]] = None, test_pipeline=None) -> dict[str, Any]:
    """Run the build and return the manifest plus a run summary (also written to run_summary.json)."""
    out = cfg.output.output_dir.rstrip("/")
    log.info("build config:\n%s", json.dumps(config_to_dict(cfg), indent=2))
    preflight(cfg)
    progress.reset()  # in-process runners share trackers: start each build's counts at zero
    options = PipelineOptions(pipeline_args or [], save_main_session=False)
    start = time.monotonic()
    p = test_pipeline or beam.Pipeline(options=options)
    _ = p | "BuildPreferences" >> BuildPreferences(cfg)
    result = p.run()
    result.wait_until_finish()
    wall = time.monotonic() - start
    with fsspec.open(f"{out}/manifest.json", "r") as f:
        manifest = json.load(f)
    counters = _synpref_counters(result)
    summary = {"wall_seconds": round(wall, 2),
               "stage_busy_seconds": {k[:-3]: v / 1000.0 for k, v in counters.items() if k.endswith("_ms")},
               "counters": {k: v for k, v in counters.items() if not k.endswith("_ms")},
               "manifest": f"{out}/manifest.json", "ranked_shards": [s["ranked_tar"] for s in manifest["shards"]],
               "pair_shards": [s["pairs_tar"] for s in manifest["shards"]], "counts": manifest["counts"]}
    with fsspec.open(f"{out}/run_summary.json", "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return {"manifest": manifest, "summary": summary}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML job config (see jobs/demo_build.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set output.output_dir=gs://bucket/run1")
    return parser.parse_known_args(argv)


def run(argv=None, test_pipeline=None) -> dict[str, Any]:
    args, pipeline_args = parse_args(argv)
    cfg = load_build_config(args.config, args.set)
    return build(cfg, pipeline_args, test_pipeline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run()
