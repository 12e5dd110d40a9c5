"""The launch sequence the pipelines (build, filter, evaluate) share, in order:

refuse unknown flags -> preflight (once) -> lock the output folder -> claim it (marker) -> up to date? ->
remove the old manifest (and the job's other result files) -> run the Beam pipeline -> read the manifest it
wrote -> sweep stale files -> run_summary.json.

Each pipeline file supplies only its composite transform and its few job-specific functions.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import apache_beam as beam
import fsspec
from apache_beam.options.pipeline_options import PipelineOptions

from ..core import progress
from .beam_flags import check_beam_flags
from .errors import RunRefused
from .output_folder import claim_folder, locked_output, require_location
from .up_to_date import start_fresh_manifest
from ..core.fileio import write_json

log = logging.getLogger("synpref.runs")


@dataclass
class Job:
    """What differs between the build and the filter; see ``run_job``."""

    kind: str                                    # "build" | "filter" | "evaluate": the marker's kind and command
    output_dir: str
    beam_flags: list[str]
    preflight: Callable[[], Any]                 # raises ValueError / FileNotFoundError: a user mistake
    transform: Callable[[Any], beam.PTransform]  # the preflight's result -> the whole job as one composite
    problems: Callable[[dict], list[str]]        # the finished manifest -> why it is not a success
    up_to_date: Optional[Callable[[], Optional[dict]]] = None  # a finished identical run's manifest, or None
    finish: Optional[Callable[[dict, list[str]], dict]] = None  # (manifest, problems) -> extra summary fields
    sweep: Optional[Callable[[str, dict], list[str]]] = None    # delete what an earlier run left, not this one
    config: Optional[dict] = None                # logged once the folder is ours
    config_file: str = ""                        # if set, ``config`` is also written there (relative to the folder)
    results: tuple[str, ...] = ()                # files claiming a finished run, removed with the manifest
    output_key: str = "output.output_dir"        # the config key of ``output_dir``, for error messages


def synpref_counters(result) -> dict[str, int]:
    """synpref's Beam counters summed over steps and workers; empty if the runner reports none."""
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # noqa: BLE001 - some runners do not report metrics to the launcher
        return {}
    totals: dict[str, int] = {}
    for c in counters:
        if c.key.metric.namespace == "synpref":
            name = c.key.metric.name
            totals[name] = totals.get(name, 0) + (c.committed or c.attempted or 0)
    return totals


def run_job(job: Job, test_pipeline=None, force_unlock: bool = False) -> dict[str, Any]:
    """Run ``job`` under the output folder's lock; returns ``{"manifest", "summary"}``.

    Raises ``RunRefused`` (one line, exit 2) for anything found before work starts; anything the runner
    raises after that is a run failure (exit 1).
    """
    out = require_location(job.output_dir, job.output_key)
    check_beam_flags(job.beam_flags)
    try:
        prepared = job.preflight()
    except (ValueError, FileNotFoundError) as e:
        raise RunRefused(" ".join(str(e).split())) from None
    with locked_output(out, f"synpref {job.kind}", force_unlock):
        claim_folder(out, job.kind)
        if job.config is not None:
            logging.getLogger(f"synpref.{job.kind}").info("%s config: %s", job.kind,
                                                          json.dumps(job.config, sort_keys=True))
            if job.config_file:
                write_json(f"{out}/{job.config_file}", job.config)
        done = job.up_to_date() if job.up_to_date else None
        if done is not None:
            log.info("an identical finished %s is already in %s: nothing to do", job.kind, out)
            summary = {"wall_seconds": 0.0, "stage_busy_seconds": {}, "counters": {}, "up_to_date": True,
                       "manifest": f"{out}/manifest.json", "counts": done["counts"], "problems": [],
                       "staging": "not needed: the build was already complete"}
            return {"manifest": done, "summary": summary}
        progress.reset()  # in-process runners share trackers: start each run's counts at zero
        start_fresh_manifest(out, job.results)
        start = time.monotonic()
        p = test_pipeline or beam.Pipeline(options=PipelineOptions(job.beam_flags, save_main_session=False))
        _ = p | job.transform(prepared)
        result = p.run()
        result.wait_until_finish()
        wall = time.monotonic() - start
        with fsspec.open(f"{out}/manifest.json", "r") as f:
            manifest = json.load(f)
        if job.sweep:
            job.sweep(out, manifest)
        counters = synpref_counters(result)
        problems = job.problems(manifest)
        summary = {"wall_seconds": round(wall, 2),
                   "stage_busy_seconds": {k[:-3]: v / 1000.0 for k, v in counters.items() if k.endswith("_ms")},
                   "counters": {k: v for k, v in counters.items() if not k.endswith("_ms")},
                   "manifest": f"{out}/manifest.json", "counts": manifest["counts"], "problems": problems,
                   **(job.finish(manifest, problems) if job.finish else {})}
        write_json(f"{out}/run_summary.json", summary)
        return {"manifest": manifest, "summary": summary}
