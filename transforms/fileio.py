"""Atomic writes and whole-file reads over fsspec (local, gs://, s3://, memory://)."""
from __future__ import annotations

import hashlib
import json
import math

import fsspec


class AtomicFile:
    """``with AtomicFile(uri) as f`` writes ``uri.tmp`` and renames it to ``uri`` only on success.

    Readers never see half a file; a crashed run's ``.tmp`` is overwritten by the rerun.
    """

    def __init__(self, uri: str):
        self.fs, self.path = fsspec.core.url_to_fs(uri)
        self.tmp = self.path + ".tmp"

    def __enter__(self):
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.f = self.fs.open(self.tmp, "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        self.f.close()
        if exc_type is None:
            self.fs.mv(self.tmp, self.path)
        else:
            self.fs.rm(self.tmp)


def write_atomic(uri: str, data: bytes) -> None:
    with AtomicFile(uri) as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as f:
        return f.read()


def dumps_strict(obj, **kwargs) -> str:
    """``json.dumps`` refusing NaN and infinity: every JSON file synpref writes is strict JSON."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def canonical_json(obj) -> bytes:
    """Sorted keys, no spaces, UTF-8, strict: the bytes of shard members and fingerprints."""
    return dumps_strict(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def write_json(uri: str, obj) -> None:
    """Indented, key-sorted strict JSON, written atomically."""
    write_atomic(uri, dumps_strict(obj, indent=2, sort_keys=True).encode())


def sha256_of(uri: str, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed (the content fingerprint shards are checked against)."""
    h = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def finite_or_none(obj):
    """``obj`` with every NaN or infinity replaced by None: for records where a diverged value is data (a
    training loss), written as ``null`` rather than refused."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj
