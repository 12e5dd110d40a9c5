"""After a run, delete the staging folder (``remove_staging``) and the files an earlier run of the same kind left that this run did not write (it had
more shards, or crashed mid-file). Only in a folder carrying that kind's marker, only under synpref's own
subfolders and only names synpref's writers produce: nothing else in the folder is ever touched."""
from __future__ import annotations

import logging
import re

import fsspec

from .output_folder import is_ours
from ..transforms.writing import shard_paths

log = logging.getLogger("synpref.runs")

BUILD_FILES = {"ranked": re.compile(r"^ranked-\d{5}\.(tar|parquet)(\.tmp)?$"),
               "pairs": re.compile(r"^pairs-\d{5}\.(tar|parquet)(\.tmp)?$"),
               "_stats": re.compile(r"^shard-\d{5}\.json(\.tmp)?$"),
               "dead_letter": re.compile(r"^(drops-.*\.jsonl|beam-temp-.*)$")}
FILTER_FILES = {"shards": re.compile(r"^filtered-\d{5,}(-\d{5,})?\.tar(\.tmp)?$"),
                "index": re.compile(r"^samples-\d{5}\.parquet(\.tmp)?$"),
                "dead_letter": re.compile(r"^drops-\d{5}\.jsonl(\.tmp)?$")}


def remove_unlisted(output_dir: str, kind: str, ours: dict[str, re.Pattern], written: set[str]) -> list[str]:
    """Delete files under ``output_dir/<sub>/`` matching ``ours[sub]`` and not in ``written`` (URLs)."""
    root = output_dir.rstrip("/")
    if not is_ours(root, kind):
        return []
    fs, path = fsspec.core.url_to_fs(root)
    keep = {fsspec.core.url_to_fs(p)[1] for p in written}
    removed = []
    for sub, pattern in ours.items():
        for p in fs.glob(f"{path}/{sub}/*"):
            if pattern.match(p.rsplit("/", 1)[-1]) and p not in keep:
                fs.rm(p, recursive=True)
                removed.append(p)
    if removed:
        log.info("removed %d stale file(s) from an earlier run of %s", len(removed), root)
    return removed


def sweep_build(output_dir: str, manifest: dict) -> list[str]:
    root = output_dir.rstrip("/")
    written = {p for s in manifest["shards"] for k, p in shard_paths(root, int(s["shard"])).items() if k != "name"}
    written |= set(manifest.get("dead_letter_files", []))
    return remove_unlisted(root, "build", BUILD_FILES, written)


def sweep_filter(output_dir: str, manifest: dict) -> list[str]:
    root = output_dir.rstrip("/")
    files = ({s["tar"] for s in manifest["shards"]} | set(manifest.get("index_files", []))
             | set(manifest.get("dead_letter_files", [])))
    return remove_unlisted(root, "filter", FILTER_FILES, {f"{root}/{f}" for f in files})


def remove_staging(cfg) -> str:
    """Delete the default staging folder after a clean build (policy ``output.staging``); say what happened."""
    if cfg.output.staging == "keep":
        return f"kept at {cfg.staging_dir} (output.staging: keep)"
    if cfg.output.staging_dir:
        return f"kept at {cfg.staging_dir} (a custom staging_dir is a shared cache)"
    fs, path = fsspec.core.url_to_fs(cfg.staging_dir)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    return "removed (every image is in the tars; output.staging: keep keeps it for reruns)"


EVAL_IMAGE = re.compile(r"^[A-Za-z0-9_-]+/[0-9a-f]+-\d+\.png(\.tmp)?$")


def sweep_evaluate(output_dir: str, manifest: dict) -> list[str]:
    """PNGs under ``images/<model>/`` named as evaluate names them that this run did not write (an earlier
    run had more prompts, seeds or models, or was killed mid-file)."""
    root = output_dir.rstrip("/")
    if not is_ours(root, "evaluate"):
        return []
    fs, path = fsspec.core.url_to_fs(root)
    keep = set(manifest.get("images", {}))
    removed = []
    for p in fs.glob(f"{path}/images/*/*"):
        rel = p[len(path):].lstrip("/")
        if EVAL_IMAGE.match(rel[len("images/"):]) and rel not in keep:
            fs.rm(p)
            removed.append(p)
    if removed:
        log.info("removed %d stale image(s) from an earlier run of %s", len(removed), root)
    return removed
