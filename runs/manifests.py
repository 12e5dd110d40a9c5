"""What a manifest says about the job that wrote it: the header both pipelines write, and the build's
run fingerprint (what its bytes depend on; a matching finished build is not run again)."""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from ..core import __version__
from ..schemas.config import BuildConfig
from ..schemas.loading import dump_config
from ..schemas.eval_config import EvalConfig
from ..schemas.filter_config import FilterJobConfig
from ..transforms.rewards import create_reward
from ..transforms.staging import IMAGE_EXT, generator_fingerprint, model_fingerprint
from ..transforms.writing import SHARD_FORMAT


def describe_rewards(rewards) -> list[dict[str, Any]]:
    """Each reward's name, version, params and files with their fingerprints (see ``Reward.describe``)."""
    return [create_reward(r.name, r.params).describe() for r in rewards]


def _hash(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def prompt_files(location: str) -> str:
    """The prompt source by content (builtin, a file or folder); an ``hf://`` id as it is."""
    if location == "builtin":
        return hashlib.sha256(
            resources.files("synpref.jobs").joinpath("builtin_prompts.jsonl").read_bytes()).hexdigest()
    return model_fingerprint(location) if location and not location.startswith("hf://") else location


def run_fingerprint(cfg: BuildConfig) -> str:
    """A hash of everything a finished build's bytes depend on: the config (except Beam flags, which
    the tests show do not change bytes, and locations), generator, reward and prompt files, and
    synpref's formats. A rerun whose fingerprint matches a finished, intact build does nothing."""
    config = dump_config(cfg)
    config.pop("beam_options")
    for where in ("output_dir", "staging_dir", "staging"):  # where things go, not what they hold
        config["output"].pop(where)
    return _hash({"config": config, "synpref": __version__, "shard_format": SHARD_FORMAT,
                  "generators": [generator_fingerprint(g) for g in cfg.generators],
                  "rewards": describe_rewards(cfg.rewards),
                  "prompts": prompt_files(cfg.prompts.source)})


def build_header(cfg: BuildConfig) -> dict[str, Any]:
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
        "rewards": [{**d, "rank": r.rank} for r, d in zip(cfg.rewards, describe_rewards(cfg.rewards))],
        "generators": [dump_config(g) for g in cfg.generators],
        "config": dump_config(cfg),
    }


def filter_header(cfg: FilterJobConfig, shards: list[str]) -> dict[str, Any]:
    config = dump_config(cfg)
    config.pop("beam_options")
    config["output"].pop("output_dir")
    return {
        "synpref_version": __version__,
        "job": "filter",
        "input_shards": shards,
        "layout": {
            "shards": "shards/filtered-{n}-{k}.tar: the kept samples of input shard n in input order, samples_per_shard "
                      "per tar; keys as written (see docs/output_folders.md), "
                      "image and .txt bytes; json = the original metadata + synpref_scores + synpref_source",
            "sizes": "shards/sizes.json: {tar file name: samples}, the dataset-size file open_clip's trainer reads",
            "index": "index/samples-{n}.parquet: every sample of input shard n: key, scores, kept, reason",
            "dead_letter": "dead_letter/drops-{n}.jsonl: every dropped sample of input shard n, with reason",
        },
        "rewards": describe_rewards(cfg.rewards),
        "config_fingerprint": _hash(config),
        "config": config,
    }


def eval_header(cfg: EvalConfig) -> dict[str, Any]:
    """The evaluation manifest's header. ``run_fingerprint``: what a finished evaluation's files depend on:
    the config as run (not its locations or Beam flags), every model's files (a LoRA's or denoiser's by
    content: ``model_fingerprints``, which generation reuses rather than hash the weights again), the judges'
    files, the prompts. A rerun whose fingerprint matches a finished, healthy, intact evaluation does nothing."""
    config = cfg.resolved()
    for where in ("beam_options", "output_dir", "staging_dir"):
        config.pop(where)
    models = {g.id: generator_fingerprint(g) for g in cfg.generator_configs()}
    fingerprint = _hash({"config": config, "synpref": __version__, "job": "evaluate", "models": list(models.values()),
                         "judges": describe_rewards(cfg.reward_configs()), "prompts": prompt_files(cfg.prompts.source)})
    return {"synpref_version": __version__, "job": "evaluate", "run_fingerprint": fingerprint,
            "model_fingerprints": models, "config": cfg.resolved()}
