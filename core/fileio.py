"""Atomic writes and whole-file reads over fsspec (local, gs://, s3://, memory://)."""
from __future__ import annotations

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
