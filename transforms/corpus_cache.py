"""Resume for ``synpref filter``: scored chunks cached under a key of their content and the scoring settings.

Scoring (decode + models) is the costly part of a filter run; reading a shard again, dedup, filters
and writing are cheap and are redone on every run (a cross-shard dedup or a global quantile can
change when any shard does). A chunk (``input.batch_size`` consecutive samples of one shard, as
``ReadShards`` cuts them) is cached as soon as it is scored, as ``_cache/<k[:2]>/<k>.parquet``, with
``k`` = sha256 of the scoring settings (each reward's ``describe()``: name, version, params, weight
fingerprint; pixel limit, JPEG draft, perceptual hash, chunk size, chunks per call) and of what each
sample's results depend on (key, image member name, image sha256, caption bytes). On a rerun the
reader cuts the same chunks, and a chunk whose file exists is not scored again: its results (size,
dHash, scores or drop reason) are put back on the freshly read records. Nothing waits for a whole
shard or job before it is cached, so a kill loses at most the chunks in flight; a changed setting or
changed bytes give another key, so stale scores are never read. A chunk with a ``scoring_error`` (possibly transient) is not cached, so a rerun retries it.
Thresholds, top fraction, dedup and ``samples_per_shard`` are not in the key: changing them reuses
the scores.

Pruning (``PruneCache``, ``output.prune_cache``, on by default): once a run's manifest is written, every
cache entry the run did not use (neither read nor written: other scoring settings, shards whose bytes
changed or that left the input, a killed run's ``.tmp`` files) is deleted, so ``_cache`` holds exactly the
current config's and inputs' chunks and a rerun of the same job still scores nothing. It is a
distributed anti-join: the reader emits every chunk's key (``LIVE``), the 256 prefix folders are listed
in parallel, and a ``CoGroupByKey`` on the chunk key deletes files no live key matches; no step holds
all keys. Nothing is pruned by a run that stops before its manifest (a kill, a failure).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Optional, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from ..schemas.records import CorpusRecord, Drop
from ..core.fileio import AtomicFile

CACHED = "cached"
LIVE = "live"  # the reader's tagged output: the key of every chunk this run reads or scores
_PREFIXES = tuple(f"{i:02x}" for i in range(256))
_ENTRY = re.compile(r"^([0-9a-f]{64})\.parquet(\.tmp)?$")  # what write_chunk writes; nothing else is touched

RESULT_SCHEMA = pa.schema([
    ("key", pa.string()), ("width", pa.int64()), ("height", pa.int64()), ("dhash", pa.string()),
    ("score_names", pa.list_(pa.string())), ("score_values", pa.list_(pa.float64())),
    ("drop_reason", pa.string()), ("drop_stage", pa.string()), ("drop_detail", pa.string()),
])


def chunk_path(cache_dir: str, scoring_key: str, chunk: Sequence[tuple[CorpusRecord, bytes]]) -> str:
    h = hashlib.sha256(scoring_key.encode())
    for rec, _ in chunk:
        # what the results depend on; not the location (bytes moved within a shard are the same bytes)
        h.update(json.dumps([rec.key, rec.image_member, rec.image_sha256, rec.caption_bytes.hex()]).encode() + b"\n")
    k = h.hexdigest()
    return f"{cache_dir.rstrip('/')}/{k[:2]}/{k}.parquet"


def chunk_key(path: str) -> str:
    """The chunk key ``k`` of ``chunk_path``'s ``.../<k[:2]>/<k>.parquet``."""
    return path.rsplit("/", 1)[-1].split(".", 1)[0]


def _row(r: CorpusRecord) -> dict:
    d = r.dropped
    return {"key": r.key, "width": r.width, "height": r.height, "dhash": r.dhash,
            "score_names": list(r.scores), "score_values": list(r.scores.values()),  # config order
            "drop_reason": d.reason if d else None, "drop_stage": d.stage if d else None,
            "drop_detail": d.detail if d else None}


def _merge(rec: CorpusRecord, row: dict) -> CorpusRecord:
    if row["key"] != rec.key:
        raise ValueError(f"cache entry for {row['key']} read for {rec.key}")
    rec = dataclasses.replace(rec, width=row["width"], height=row["height"], dhash=row["dhash"],
                              scores=dict(zip(row["score_names"], row["score_values"])))
    if row["drop_reason"] is None:
        return rec
    return dataclasses.replace(rec, dropped=Drop(CorpusRecord.level, row["drop_reason"], rec.key, row["drop_stage"],
                                                 row["drop_detail"]))


def read_chunk(path: str, chunk: Sequence[tuple[CorpusRecord, bytes]]) -> Optional[list[CorpusRecord]]:
    """The chunk's records with their cached results, or None when there is no (readable) cache file."""
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    try:
        with fs.open(p, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    except (OSError, ValueError, pa.ArrowException):
        return None  # unreadable: score again (and overwrite)
    if len(rows) != len(chunk):
        return None
    Metrics.counter("synpref", "chunks_reused").inc()
    return [_merge(rec, row) for (rec, _), row in zip(chunk, rows)]


def write_chunk(path: str, records: Sequence[CorpusRecord]) -> None:
    if any(r.reason == "scoring_error" for r in records):
        return
    with AtomicFile(path) as f:
        pq.write_table(pa.Table.from_pylist([_row(r) for r in records], schema=RESULT_SCHEMA), f)


def scoring_key(reward_descriptions: Sequence[dict], settings: dict) -> str:
    return hashlib.sha256(json.dumps({"rewards": list(reward_descriptions), "settings": settings},
                                     sort_keys=True, default=str).encode()).hexdigest()


def _entries(prefix: str, cache_dir: str, _written):
    """(chunk key, path) of every cache entry under ``<cache_dir>/<prefix>/`` (listed only once the run's
    manifest, the side input, exists: every file this run writes is there by then)."""
    fs, root = fsspec.core.url_to_fs(cache_dir.rstrip("/"))
    try:
        paths = fs.ls(f"{root}/{prefix}", detail=False)
    except FileNotFoundError:
        return
    for p in paths:
        m = _ENTRY.match(p.rsplit("/", 1)[-1])
        if m:
            yield m.group(1), p


def _delete_unused(element, cache_dir: str):
    _, groups = element
    if any(True for _ in groups["live"]):
        return
    fs, _ = fsspec.core.url_to_fs(cache_dir)
    for p in groups["files"]:
        fs.rm(p)
        Metrics.counter("synpref", "cache_entries_pruned").inc()
        yield p


class PruneCache(beam.PTransform):
    """Live chunk keys -> paths of the cache entries deleted: those no live key names, listed after
    ``written`` (a one-element PCollection: the manifest) exists."""

    def __init__(self, cache_dir: str, written):
        super().__init__()
        self.cache_dir, self.written = cache_dir, written

    def expand(self, live):
        files = (live.pipeline
                 | "CachePrefixes" >> beam.Create(_PREFIXES)
                 | "ListEntries" >> beam.FlatMap(_entries, self.cache_dir, beam.pvalue.AsSingleton(self.written)))
        return ({"files": files, "live": live | "KeyLive" >> beam.Map(lambda k: (k, None))}
                | "ByChunkKey" >> beam.CoGroupByKey()
                | "DeleteUnused" >> beam.FlatMap(_delete_unused, self.cache_dir))
