"""The build pipeline: prompts -> candidates -> rewards -> Syn-Pic ranks -> filtered pairs -> shards + manifest.

    python -m synpref.pipelines.build_preferences --config jobs/demo_build.yaml [--set k=v] [beam flags]

Beam flags (``--runner``, ``--setup_file``, ``--direct_running_mode``...) pass through unchanged, so the same
job runs on the DirectRunner, Dataflow, Flink or Spark; a flag Beam does not define is refused. The run's
bookkeeping (lock, marker, up-to-date check, health, summary) is ``synpref.runs``.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

import apache_beam as beam

from .preflight import preflight
from ..runs.health import build_problems
from ..runs.manifests import build_header, describe_rewards, run_fingerprint
from ..runs.pipeline_run import Job, run_job
from ..runs.stale_files import remove_staging, sweep_build
from ..runs.up_to_date import finished_build
from ..schemas.config import BuildConfig, load_build_config
from ..schemas.loading import add_config_args, dump_config
from ..transforms.accounting import CountAs, WriteDeadLetters, WriteManifest
from ..transforms.filtering import FilterPairs
from ..transforms.generation import GenerateCandidates
from ..transforms.prompts import ReadPrompts
from ..transforms.ranking import FilterCandidates, GroupByPrompt, RankGroups
from ..transforms.scoring import ScoreCandidates
from ..transforms.writing import WriteShards

log = logging.getLogger("synpref.build")


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
        grouped = (prompts["prompts"], scored["scored"]) | "GroupByPrompt" >> GroupByPrompt()
        candidates = grouped | "FilterCandidates" >> FilterCandidates(cfg.filter)
        ranked = candidates["groups"] | "RankCandidates" >> RankGroups(
            list(cfg.ranking_rewards), cfg.ranking.aggregator, cfg.filter.min_candidates,
            reward_weights=cfg.ranking.reward_weights, zscore_scope=cfg.ranking.zscore_scope)
        filtered = ranked["groups"] | "FilterNoisyPairs" >> FilterPairs(cfg.filter)
        reward_info = {r["name"]: {"version": r["version"], "fingerprint": r["fingerprint"]}
                       for r in describe_rewards(cfg.rewards)}
        shards = filtered["groups"] | "WriteShards" >> WriteShards(out, cfg.output.samples_per_shard, n, reward_info)

        drops = ([s["dropped"] for s in (prompts, generated, scored, candidates, ranked, filtered)]
                 | "AllDrops" >> beam.Flatten())
        dead_letter_files = drops | "DeadLetters" >> WriteDeadLetters(out)
        counts = [
            prompts["read"] | "CountRead" >> CountAs("prompts_read"),
            prompts["prompts"] | "CountKept" >> CountAs("prompts_kept"),
            ranked["groups"] | "CountPairs" >> CountAs("pairs_considered", lambda g: len(g.pairs)),
        ] | "AllCounts" >> beam.Flatten()
        return (counts, drops, shards, dead_letter_files, ranked["stats"]) | "WriteManifest" >> WriteManifest(
            f"{out.rstrip('/')}/manifest.json", build_header(cfg), per_prompt)


def build(cfg: BuildConfig, pipeline_args: Optional[list[str]] = None, test_pipeline=None,
          force_unlock: bool = False) -> dict[str, Any]:
    """Run the build and return the manifest plus a run summary (also written to run_summary.json)."""
    out = str(cfg.output.output_dir or "").rstrip("/")

    def problems(manifest: dict) -> list[str]:
        return build_problems(manifest, cfg)

    def finish(manifest: dict, found: list[str]) -> dict:
        return {"ranked_shards": [s["ranked_tar"] for s in manifest["shards"]],
                "pair_shards": [s["pairs_tar"] for s in manifest["shards"]],
                "staging": remove_staging(cfg) if not found else f"kept at {cfg.staging_dir} (the run has problems)"}

    return run_job(Job(
        kind="build", output_dir=out, beam_flags=list(cfg.beam_options) + list(pipeline_args or []),
        preflight=lambda: preflight(cfg), transform=lambda _: "BuildPreferences" >> BuildPreferences(cfg),
        problems=problems, up_to_date=lambda: finished_build(out, run_fingerprint(cfg), problems),
        finish=finish, sweep=sweep_build, config=dump_config(cfg)),
        test_pipeline=test_pipeline, force_unlock=force_unlock)


def run(argv=None, test_pipeline=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, "jobs/demo_build.yaml")
    parser.add_argument("--force-unlock", action="store_true", help="take the output folder's lock from its owner")
    args, pipeline_args = parser.parse_known_args(argv)
    return build(load_build_config(args.config, args.set), pipeline_args, test_pipeline, args.force_unlock)


if __name__ == "__main__":
    from ..reporting.summaries import build_summary

    logging.basicConfig(level=logging.INFO)
    print(build_summary(run()))
