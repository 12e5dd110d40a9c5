"""The build pipeline: prompts -> candidates -> rewards -> Syn-Pic ranks -> filtered pairs -> shards + manifest.

    python -m synpref.pipelines.build_preferences --config jobs/demo_build.yaml [--set k=v] [beam flags]

Beam flags (``--runner``, ``--setup_file``, ``--direct_running_mode``...) pass
through unchanged, so the same job runs on the DirectRunner, Dataflow, Flink or Spark.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from importlib import resources
from typing import Any, Optional

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

from ..core import __version__
from ..core import progress
from ..schemas.config import BuildConfig, load_build_config
from ..schemas.loading import add_config_args, dump_config
from ..transforms.accounting import CountAs, WriteDeadLetters, WriteManifest
from ..transforms.filtering import FilterPairs
from ..transforms.generation import GenerateCandidates
from .preflight import preflight
from ..transforms.prompts import ReadPrompts
from ..transforms.ranking import RankGroups
from ..transforms.rewards import create_reward
from ..transforms.scoring import ScoreCandidates
from ..transforms.staging import IMAGE_EXT, generator_fingerprint, model_fingerprint
from ..transforms.writing import SHARD_FORMAT, WriteShards, shard_paths

log = logging.getLogger("synpref.build")


def describe_rewards(cfg: BuildConfig) -> list[dict[str, Any]]:
    """Each reward's name, version, params and files with their fingerprints (see ``Reward.describe``)."""
    return [create_reward(r.name, r.params).describe() for r in cfg.rewards]


def run_fingerprint(cfg: BuildConfig) -> str:
    """A hash of everything a finished build's bytes depend on: the config (except Beam flags, which
    the tests show do not change bytes, and locations), generator, reward and prompt files, and
    synpref's formats. A rerun whose fingerprint matches a finished, intact build does nothing."""
    def prompt_files(location: str) -> str:
        if location == "builtin":
            return hashlib.sha256(
                resources.files("synpref.jobs").joinpath("builtin_prompts.jsonl").read_bytes()).hexdigest()
        return model_fingerprint(location) if location and not location.startswith("hf://") else location

    config = dump_config(cfg)
    config.pop("beam_options")
    for where in ("output_dir", "staging_dir", "staging"):  # where things go, not what they hold
        config["output"].pop(where)
    doc = {"config": config, "synpref": __version__, "shard_format": SHARD_FORMAT,
           "generators": [generator_fingerprint(g) for g in cfg.generators],
           "rewards": describe_rewards(cfg),
           "prompts": prompt_files(cfg.prompts.source)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def manifest_header(cfg: BuildConfig) -> dict[str, Any]:
    ext = IMAGE_EXT[cfg.output.image_format]
    return {
        "synpref_version": __version__,
        "run_fingerprint": run_fingerprint(cfg),
        "output_dir": cfg.output.output_dir,
        "layout": {
            "ranked": f"ranked/ranked-{{shard}}.tar: key=prompt_id; img0.{ext}..img{{k-1}}.{ext} in rank order; "
                      "json labels",
            "pairs": f"pairs/pairs-{{shard}}.tar: key=<winner>__<loser>; win.{ext}, lose.{ext}, json",
            "index": "<tar name>.parquet beside each tar",
            "dead_letter": "dead_letter/drops-*.jsonl",
        },
        "aggregator": cfg.ranking.aggregator,
        "max_candidates": len(cfg.generators) * cfg.candidates_per_generator,
        "rewards": [{**d, "rank": r.rank} for r, d in zip(cfg.rewards, describe_rewards(cfg))],
        "generators": [dump_config(g) for g in cfg.generators],
        "config": dump_config(cfg),
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
            torch_threads=cfg.torch_threads, image_format=cfg.output.image_format,
            jpeg_quality=cfg.output.jpeg_quality)
        scored = generated["units"] | "ScoreCandidates" >> ScoreCandidates(
            cfg.rewards, expected_images=None if n is None else n * per_prompt, torch_threads=cfg.torch_threads)
        ranked = (prompts["prompts"], scored["scored"]) | "RankCandidates" >> RankGroups(
            list(cfg.ranking_rewards), cfg.ranking.aggregator, cfg.filter.min_candidates,
            reward_weights=cfg.ranking.reward_weights, zscore_scope=cfg.ranking.zscore_scope,
            candidate_filter=cfg.filter)
        filtered = ranked["groups"] | "FilterNoisyPairs" >> FilterPairs(cfg.filter)
        reward_info = {r["name"]: {"version": r["version"], "fingerprint": r["fingerprint"]}
                       for r in describe_rewards(cfg)}
        shards = filtered["groups"] | "WriteShards" >> WriteShards(out, cfg.output.samples_per_shard, n, reward_info)

        drops = [s["dropped"] for s in (prompts, generated, scored, ranked, filtered)] | "AllDrops" >> beam.Flatten()
        dead_letter_files = drops | "DeadLetters" >> WriteDeadLetters(out)
        counts = [
            prompts["read"] | "CountRead" >> CountAs("prompts_read"),
            prompts["prompts"] | "CountKept" >> CountAs("prompts_kept"),
            ranked["groups"] | "CountPairs" >> CountAs("pairs_considered", lambda g: len(g.pairs)),
        ] | "AllCounts" >> beam.Flatten()
        return (counts, drops, shards, dead_letter_files, ranked["stats"]) | "WriteManifest" >> WriteManifest(
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


def health_problems(manifest: dict[str, Any], cfg: BuildConfig) -> list[str]:
    """Why this run should not count as a success (empty list = it should).

    A ledger that does not balance, nothing written, or any generator or reward that lost more
    than ``max_error_share`` of its items to errors (each one is in dead_letter/ with its reason).
    """
    c, errors = manifest["counts"], manifest.get("errors_by_stage", {})
    problems = [f"ledger does not balance for {level}: in {v['in']} != written {v['written']} + dropped "
                f"{v['dropped_total']}" for level, v in c.items() if not v["balanced"]]
    if c["prompts"]["written"] == 0:
        problems.append("no prompt produced a sample: see the dropped counts above and dead_letter/")
    per_generator = c["candidates"]["in"] // max(1, len(cfg.generators))
    generated = c["candidates"]["in"] - sum(e["count"] for stage, e in errors.items() if stage.startswith("generate:"))
    for stage, e in sorted(errors.items()):
        what, name = stage.split(":", 1)
        attempted = per_generator if what == "generate" else max(1, generated)
        if e["count"] > cfg.max_error_share * attempted:
            kind = "generator" if what == "generate" else "reward"
            problems.append(f"{kind} {name}: {e['count']} of {attempted} images failed "
                            f"(max_error_share {cfg.max_error_share}); first: {e['first']}")
    return problems


def _up_to_date(out: str, fingerprint: str) -> Optional[dict[str, Any]]:
    """The manifest of a finished build of exactly this job whose files are all still there, else None."""
    fs, path = fsspec.core.url_to_fs(f"{out}/manifest.json")
    if not fs.exists(path):
        return None
    try:
        manifest = json.loads(fs.cat_file(path))
    except ValueError:
        return None
    if manifest.get("run_fingerprint") != fingerprint:
        return None
    for shard in manifest.get("shards", []):
        paths = shard_paths(out, int(shard["shard"]))
        for key, size in (shard.get("sizes") or {"missing": -1}).items():
            p = fsspec.core.url_to_fs(paths.get(key, ""))[1]
            if not fs.exists(p) or fs.size(p) != size:
                return None
    return manifest


def _start_fresh_manifest(out: str) -> None:
    """A rerun first removes the old manifest: while shards are being rewritten, nothing claims they are done."""
    fs, path = fsspec.core.url_to_fs(f"{out}/manifest.json")
    if fs.exists(path):
        fs.rm(path)


def _remove_staging(cfg: BuildConfig) -> str:
    """Delete the default staging folder after a clean run (policy ``output.staging``); say what happened."""
    if cfg.output.staging == "keep":
        return f"kept at {cfg.staging_dir} (output.staging: keep)"
    if cfg.output.staging_dir:
        return f"kept at {cfg.staging_dir} (a custom staging_dir is a shared cache)"
    fs, path = fsspec.core.url_to_fs(cfg.staging_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    return "removed (every image is in the tars; output.staging: keep keeps it for reruns)"


def build(cfg: BuildConfig, pipeline_args: Optional[list[str]] = None, test_pipeline=None) -> dict[str, Any]:
    """Run the build and return the manifest plus a run summary (also written to run_summary.json)."""
    out = cfg.output.output_dir.rstrip("/")
    log.info("build config: %s", json.dumps(dump_config(cfg), sort_keys=True))
    preflight(cfg)
    done = _up_to_date(out, run_fingerprint(cfg))
    if done is not None:
        log.info("an identical finished build is already in %s: nothing to do", out)
        summary = {"wall_seconds": 0.0, "stage_busy_seconds": {}, "counters": {}, "up_to_date": True,
                   "manifest": f"{out}/manifest.json", "counts": done["counts"], "problems": [],
                   "staging": "not needed: the build was already complete"}
        return {"manifest": done, "summary": summary}
    progress.reset()  # in-process runners share trackers: start each build's counts at zero
    _start_fresh_manifest(out)
    options = PipelineOptions(list(cfg.beam_options) + list(pipeline_args or []), save_main_session=False)
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
    summary["problems"] = health_problems(manifest, cfg)
    summary["staging"] = (_remove_staging(cfg) if not summary["problems"]
                          else f"kept at {cfg.staging_dir} (the run has problems)")
    with fsspec.open(f"{out}/run_summary.json", "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    return {"manifest": manifest, "summary": summary}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, "jobs/demo_build.yaml")
    return parser.parse_known_args(argv)


def run(argv=None, test_pipeline=None) -> dict[str, Any]:
    args, pipeline_args = parse_args(argv)
    cfg = load_build_config(args.config, args.set)
    return build(cfg, pipeline_args, test_pipeline)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run()
