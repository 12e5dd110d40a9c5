"""Filter a web image-text corpus with synpref's rewards: shards -> scores -> dedup -> filters -> shards + ledger.

    synpref filter --config jobs/demo_filter.yaml [--set k=v] [beam flags]

```
ListShards -> ScoreShards -> DedupKeys -> DedupExact [-> DedupNear] [-> EmbedImages -> DedupSemantic]
    -> ApplyFilters -> WriteFiltered --------------------------------------------------------------------\
                  \______________ every drop, with its reason ____\-> WriteOutcomes --> WriteManifest
                   \___ every chunk's cache key ___________________________ PruneCache (once the manifest exists)
```
Pixels exist only inside ``ScoreShards``; later steps carry key, caption, metadata, scores and the image's
location in its source tar, and the writer copies the original bytes from there. The run's bookkeeping
(lock, marker, health, summary) is ``synpref.runs``.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

import apache_beam as beam

from ..runs.health import filter_problems
from ..runs.manifests import filter_header
from ..runs.pipeline_run import Job, run_job
from ..runs.stale_files import sweep_filter
from ..schemas.filter_config import FilterJobConfig, load_filter_config
from ..schemas.loading import add_config_args, dump_config
from ..transforms.accounting import CountDrops, WriteFilterManifest
from ..transforms.corpus_dedup import DedupExact, DedupKeys, DedupNear
from ..transforms.corpus_cache import PruneCache
from ..transforms.corpus_embeddings import EmbedCorpus
from ..transforms.embedders import create_embedder
from ..transforms.semantic_dedup import SemanticDedup
from ..transforms.corpus_scoring import DROPPED, ScoreCorpus
from ..transforms.corpus_thresholds import ApplyFilters
from ..transforms.corpus_writing import WriteFiltered, WriteOutcomes, WriteShardSizes
from ..transforms.corpus_sources import available_sources, corpus_input_from_config
from ..transforms.rewards import check_rewards
from ..core.fileio import check_writable

log = logging.getLogger("synpref.filter")


def preflight_filter(cfg: FilterJobConfig) -> list[str]:
    """The input units (raises FileNotFoundError if a source has none, ValueError if the first Parquet table
    lacks the configured columns) after checking the plug-ins the config names and that the output is writable."""
    if cfg.input.format != "auto" and cfg.input.format not in available_sources():
        raise ValueError(f"config.input.format must be auto or one of {available_sources()}, "
                         f"got {cfg.input.format!r}")
    check_rewards(cfg.rewards)
    semantic = cfg.filter.semantic_dedup
    if semantic is not None:
        create_embedder(semantic.embedder.name, semantic.embedder.params, "filter.semantic_dedup.embedder")
    corpus_input = corpus_input_from_config(cfg.input)
    shards = corpus_input.list_units(cfg.input.source)
    corpus_input.check(shards)
    out = cfg.output.output_dir.rstrip("/")
    check_writable(out, "output.output_dir")
    return shards


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
        semantic = cfg.filter.semantic_dedup
        if semantic is not None:
            embedder = semantic.embedder
            embedded = records | "EmbedImages" >> EmbedCorpus(
                embedder.name, embedder.params, out, corpus_input, batch_size=cfg.input.batch_size,
                max_pixels=cfg.input.max_pixels, jpeg_draft=cfg.input.jpeg_draft, torch_threads=cfg.torch_threads,
                model_copies=embedder.model_copies, accelerator=embedder.accelerator)
            similar = embedded["embedded"] | "DedupSemantic" >> SemanticDedup(
                semantic.threshold, num_clusters=semantic.num_clusters, sample_size=semantic.sample_size,
                iterations=semantic.iterations, seed=semantic.seed, keep_highest=semantic.keep_highest)
            drops += [embedded["dropped"], similar["dropped"]]
            records = similar["kept"]
        filtered = records | "ApplyFilters" >> ApplyFilters(cfg.filter.thresholds, cfg.filter.top_fraction,
                                                            cfg.filter.mode)
        drops.append(filtered["dropped"])
        kept = filtered["kept"]
        shards = kept | "WriteFiltered" >> WriteFiltered(out, cfg.output.samples_per_shard, corpus_input)
        dropped = drops | "AllDrops" >> beam.Flatten()
        outcomes = (dropped, kept) | "AllOutcomes" >> beam.Flatten() | "WriteOutcomes" >> WriteOutcomes(out, names)
        drop_counts = dropped | "TheirDrops" >> beam.Map(lambda r: r.dropped) | CountDrops()
        sizes = (pbegin
                 | "OnceForSizes" >> beam.Create([None])
                 | "WriteShardSizes" >> beam.ParDo(WriteShardSizes(out), beam.pvalue.AsList(shards)))
        manifest = (pbegin
                    | "Once" >> beam.Create([None])
                    | "WriteManifest" >> beam.ParDo(
                        WriteFilterManifest(f"{out}/manifest.json", self.header),
                        beam.pvalue.AsList(scored["read"]), beam.pvalue.AsDict(drop_counts),
                        beam.pvalue.AsList(shards), beam.pvalue.AsList(outcomes),
                        beam.pvalue.AsSingleton(filtered["cutoff"], default_value=None), beam.pvalue.AsList(sizes)))
        if cfg.output.prune_cache:
            _ = scored["live"] | "PruneCache" >> PruneCache(f"{out}/_cache", manifest)
        return manifest


def filter_corpus(cfg: FilterJobConfig, pipeline_args: Optional[list[str]] = None, test_pipeline=None,
                  force_unlock: bool = False) -> dict[str, Any]:
    """Run the filter job; returns the manifest and a run summary (also written to run_summary.json)."""
    return run_job(Job(
        kind="filter", output_dir=str(cfg.output.output_dir or "").rstrip("/"),
        beam_flags=list(cfg.beam_options) + list(pipeline_args or []),
        preflight=lambda: preflight_filter(cfg),
        transform=lambda shards: "FilterCorpus" >> FilterCorpus(cfg, shards, filter_header(cfg, shards)),
        problems=filter_problems, sweep=sweep_filter, config=dump_config(cfg)),
        test_pipeline=test_pipeline, force_unlock=force_unlock)


def run(argv=None, test_pipeline=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, "jobs/demo_filter.yaml")
    parser.add_argument("--force-unlock", action="store_true", help="take the output folder's lock from its owner")
    args, rest = parser.parse_known_args(argv)
    return filter_corpus(load_filter_config(args.config, args.set), rest, test_pipeline, args.force_unlock)


if __name__ == "__main__":
    from ..reporting.summaries import filter_summary

    logging.basicConfig(level=logging.INFO)
    print(filter_summary(run()))
