"""Atomic writes and whole-file reads over fsspec (local, gs://, s3://, memory://)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid

import fsspec

from .errors import error_text, one_line


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


def check_writable(url: str, what: str) -> None:
    """Create the folder and write + remove a probe file with fsspec (local, gs://, s3:// alike)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)  # inside: a missing gcsfs/s3fs is an ImportError
        probe = f"{path.rstrip('/')}/.synpref-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # any failure here (permissions, a file in the way, credentials) means no output
        raise ValueError(f"{what}: cannot be created or written: {url} ({type(e).__name__}: {one_line(e)}); "
                         "choose a folder you can write to") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def looks_like_hub_id(name: str, bare_names: bool = False) -> bool:
    """``org/name`` (or, with ``bare_names``, a legacy ``name``) that is not on disk: a hub id, which cannot
    be checked offline; anything else (a scheme, ``./``, ``/``, deeper paths) is a location."""
    if "://" in name or os.path.exists(os.path.expanduser(name)) or not _HUB_ID.fullmatch(name):
        return False
    return bare_names or name.count("/") == 1


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


def check_file_writable(uri: str) -> None:
    """A file can be written at ``uri`` (not a folder, its folder writable); ValueError, one line, if not.
    Leaves nothing behind that was not there."""
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.isdir(path):
        raise ValueError(f"{uri} is a folder: give a file name, e.g. {uri.rstrip('/')}/report.html")
    existed = fs.exists(path)
    try:
        with fs.open(path, "ab"):
            pass
        if not existed:
            fs.rm(path)
    except Exception as e:  # permissions, a missing parent, a read-only file system: no page can be written
        raise ValueError(f"{uri} cannot be written ({error_text(e)})") from None


def expand_locations(entries, ext: str) -> list[str]:
    """Files, globs and folders (their ``*.<ext>``), local or fsspec URLs, in the given order, each entry's
    matches sorted; FileNotFoundError naming an entry that matches nothing (a typo must not read nothing)."""
    import glob

    urls = []
    for entry in entries:
        fs, path = fsspec.core.url_to_fs(entry)
        if fs.isdir(path):
            found = fs.glob(path.rstrip("/") + f"/*.{ext}")
        elif glob.has_magic(path):
            found = fs.glob(path)
        else:
            found = [path] if fs.exists(path) else []
        if not found:
            raise FileNotFoundError(f"no shards found for {entry!r}: give a .{ext} file, a glob or a directory of .{ext}")
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        urls += [p if local else fs.unstrip_protocol(p) for p in sorted(found)]
    return urls
