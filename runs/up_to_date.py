"""Is an identical, finished, healthy build already in the folder? Then a rerun does nothing.

Finished: ``manifest.json`` is there and records this run's fingerprint. Intact: every shard file's bytes
still hash to the sha256 its ``_stats/`` recorded (sizes alone miss an edit in place). Healthy: the
manifest records no problem; a failed build is run again, so it reports its problems and exit code again.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Optional

import fsspec

from ..core.fileio import sha256_of
from ..transforms.writing import SHARD_FILES, shard_paths

log = logging.getLogger("synpref.runs")


def read_manifest(out: str) -> Optional[dict[str, Any]]:
    fs, path = fsspec.core.url_to_fs(f"{out}/manifest.json")
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except ValueError:
        return None


def shard_changes(out: str, shard: dict[str, Any]) -> list[str]:
    """The files of one shard entry whose bytes are missing or differ from the recorded sha256."""
    paths = shard_paths(out, int(shard["shard"]))
    recorded = shard.get("sha256") or {}
    changed = []
    for key in SHARD_FILES:
        try:
            ok = key in recorded and sha256_of(paths[key]) == recorded[key]
        except FileNotFoundError:
            ok = False
        if not ok:
            changed.append(paths[key])
    return changed


def finished_build(out: str, fingerprint: str, problems: Callable[[dict], list[str]]) -> Optional[dict[str, Any]]:
    """The manifest of a finished, healthy build of exactly this job whose files are all intact, else None."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("run_fingerprint") != fingerprint:
        return None
    if problems(manifest):
        log.info("the build in %s finished with problems: running it again", out)
        return None
    for shard in manifest.get("shards", []):
        changed = shard_changes(out, shard)
        if changed:
            log.warning("%s changed since it was written (sha256 differs): rebuilding", changed[0])
            return None
    return manifest


def start_fresh_manifest(out: str, results: tuple[str, ...] = ()) -> None:
    """A rerun first removes the old manifest (and ``results``, other files that claim a finished run):
    while outputs are being rewritten, nothing claims they are done."""
    for name in ("manifest.json", *results):
        fs, path = fsspec.core.url_to_fs(f"{out}/{name}")
        if fs.exists(path):
            fs.rm(path)


def finished_evaluation(out: str, fingerprint: str) -> Optional[dict[str, Any]]:
    """The manifest of a finished ``synpref evaluate`` of exactly this job with no problem recorded and every
    file it lists (samples, dead letters, each PNG) still holding the bytes it wrote, else None."""
    manifest = read_manifest(out)
    if manifest is None or manifest.get("run_fingerprint") != fingerprint:
        return None
    if manifest.get("problems"):
        log.info("the evaluation in %s finished with problems: running it again", out)
        return None
    for name, digest in sorted({**manifest.get("files", {}), **manifest.get("images", {})}.items()):
        try:
            ok = sha256_of(f"{out}/{name}") == digest
        except FileNotFoundError:
            ok = False
        if not ok:
            log.warning("%s/%s is missing or changed since it was written (sha256 differs): evaluating again", out, name)
            return None
    return manifest
