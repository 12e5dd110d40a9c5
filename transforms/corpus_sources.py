"""Where ``synpref filter`` reads a corpus from: one small interface, one class per input format.

A source turns one *unit* (a file: a tar shard, a Parquet table) into raw samples, streaming, and later
gives the writer a kept sample's original image bytes again from the location it reported, so records
never carry pixels or image bytes across stage boundaries. Formats are chosen by name (``input.format``)
or by the unit's file name ending (``auto``); a new format is a class with ``@register_source``.

Raw samples are ``(key, members, problem)``: ``members`` maps a WebDataset suffix (``jpg``, ``txt``,
``json``...) to ``(bytes, offset, size)``, where ``offset``/``size`` locate the image inside the unit in
the source's own terms; ``problem`` is a ``(reason, detail)`` for a sample that cannot be used as read.
"""
from __future__ import annotations

import bisect
import json
import os
import posixpath
import re
import tarfile
from typing import Any, ClassVar, Iterator, Optional, Sequence

import fsspec
import pyarrow.parquet as pq

from ..core.registry import Registry
from ..core.errors import error_line
from .imageio import IMAGE_EXTENSIONS, check_member_name

SHARD_KEY = "__shard__"  # record id of an unreadable remainder of a unit (one outcome for the rest)

SOURCES = Registry("corpus source")


def register_source(name: str):
    """Class decorator: make an input format selectable as ``input.format: name`` (sets ``cls.name``)."""
    return SOURCES.register(name)


def available_sources() -> list[str]:
    return SOURCES.names()


class CorpusSource:
    """One input format. Subclasses set ``suffixes`` and implement ``iter_samples`` and ``open_images``."""

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()  # file name endings of the units this source reads

    def iter_samples(self, url: str) -> Iterator[tuple[str, dict, Optional[tuple[str, str]]]]:
        """Yield ``(key, {suffix: (bytes, offset, size)}, problem)`` per sample of one unit, streaming.

        The last item is ``(SHARD_KEY, {}, ("unreadable_shard", detail))`` when the unit breaks off.
        """
        raise NotImplementedError

    def open_images(self, url: str) -> "ImageReader":
        """A reader of original image bytes by the ``(member, offset, size)`` that ``iter_samples`` gave."""
        raise NotImplementedError


class ImageReader:
    """Reads image bytes of one unit by location; cheapest when asked in the unit's own order."""

    def read(self, member: str, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def close(self):
        pass


def _protocol_prefix(fs) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "" if protocol in ("file", "local") else f"{protocol}://"


OUTSIDE = "outside: "  # the detail prefix of a path that leaves the corpus


def _normalise(location: str) -> str:
    """A location with ``..`` and ``.`` resolved; local paths also through symlinks (``os.path.realpath``)."""
    protocol, sep, rest = location.partition("://")
    if not sep:
        return os.path.realpath(location)
    if protocol in ("file", "local"):
        return os.path.realpath(rest)
    return f"{protocol}://{posixpath.normpath('/' + rest).lstrip('/')}"


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: key = up to the first dot of the base name, then the suffix."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    head, _, suffix = base.partition(".")
    return name[: len(name) - len(base)] + head, suffix


def _is_gzip(url: str) -> bool:
    return url.endswith((".tar.gz", ".tgz"))


@register_source("tar")
class TarSource(CorpusSource):
    """WebDataset shards in img2dataset's layout (``<key>.jpg|png|webp``, ``<key>.txt``, ``<key>.json``).

    ``.tar`` is read as a stream and the writer range-reads the image bytes by their offset.
    ``.tar.gz`` / ``.tgz`` are decompressed as a stream; a gzip member cannot be range-read, so the
    writer re-reads the shard forwards and picks the member by name (once per output shard that
    needs it: cheap when keys are in shard order, as img2dataset writes them).
    """

    suffixes = (".tar", ".tar.gz", ".tgz")

    def iter_samples(self, url: str):
        # Consecutive members with the same key form a sample (WebDataset's rule).
        key, members, problem = None, {}, None
        try:
            with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|gz" if _is_gzip(url) else "r|") as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    k, suffix = split_name(info.name)
                    if k != key:
                        if key is not None:
                            yield key, members, problem
                        key, members, problem = k, {}, None
                    if not info.isfile():
                        problem = problem or ("unsafe_member_name", f"{info.name!r} is not a regular file")
                        continue
                    try:
                        check_member_name(info.name)
                    except ValueError as e:
                        problem = problem or ("unsafe_member_name", str(e))
                        continue
                    data = tar.extractfile(info).read()
                    members[suffix] = (data, info.offset_data, info.size)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # gzip raises BadGzipFile (OSError)
            if key is not None:
                yield key, members, problem or ("unreadable_shard", f"tar breaks off in this sample: {error_line(e)}")
                key = None
            yield SHARD_KEY, {}, ("unreadable_shard", f"the rest of the shard is unreadable: {error_line(e)}")
        if key is not None:
            yield key, members, problem

    def open_images(self, url: str) -> ImageReader:
        return _GzipTarReader(url) if _is_gzip(url) else _RangeReader(url)


class _RangeReader(ImageReader):
    """Byte ranges of one file, through one open handle (seek + read)."""

    def __init__(self, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        self.f = fs.open(path, "rb")

    def read(self, member: str, offset: int, size: int) -> bytes:
        self.f.seek(offset)
        return self.f.read(size)

    def close(self):
        self.f.close()


class _GzipTarReader(ImageReader):
    """Members of a compressed tar by name, reading forwards; reopens when asked for an earlier one."""

    def __init__(self, url: str):
        self.url, self.f, self.tar, self.pos = url, None, None, -1

    def _reopen(self):
        self.close()
        self.f = fsspec.open(self.url, "rb").open()
        self.tar, self.pos = tarfile.open(fileobj=self.f, mode="r|gz"), -1

    def read(self, member: str, offset: int, size: int) -> bytes:
        if self.tar is None or offset <= self.pos:
            self._reopen()
        for info in self.tar:
            self.pos = info.offset_data
            if info.name == member and info.isfile():
                return self.tar.extractfile(info).read()
        raise IOError(f"{self.url}: member {member} not found")

    def close(self):
        if self.tar is not None:
            self.tar.close()
            self.f.close()
        self.f = self.tar = None


_SANITISE = re.compile(r"[^A-Za-z0-9_\-]")


def _sniff_suffix(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return ""


def _json_value(v: Any):
    if isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items() if not isinstance(x, (bytes, bytearray))}
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)  # timestamps, decimals...


@register_source("parquet")
class ParquetSource(CorpusSource):
    """Parquet tables with one sample per row: image bytes or an image path, a caption, a key.

    Defaults follow img2dataset's ``output_format: parquet`` (``jpg`` bytes, ``caption``, ``key``); a
    Hugging Face ``Image`` column (a struct of ``bytes`` and ``path``) works as ``image_column``.
    Paths are relative to the Parquet file's folder unless absolute or a URL, and must resolve inside that
    folder or one of ``allowed_roots`` (an untrusted table must not make synpref read ``/etc/passwd`` or
    ``../secret.jpg``): other rows are dropped as ``path_outside_corpus``. Rows are handed on in
    batches of ``batch_rows``; pyarrow decodes a whole row group's columns at once, so memory holds one
    row group at a time, never the whole table (img2dataset and ``datasets`` write groups of ~100
    images). Every column but the image bytes becomes the sample's JSON metadata, as img2dataset
    writes it beside the image in a tar. The image location is the row number, so the writer reads
    that row's bytes (or path) again, starting at its row group.

    Args:
        image_column: image bytes (or an HF Image struct); rows where it is null use ``path_column``.
        path_column: image file path or URL.
        caption_column: caption text; a missing value is ``missing_caption``.
        key_column: the sample key (kept in the output); when absent or null: ``<file stem>_<row>``.
        batch_rows: rows decoded from Parquet at a time.
        allowed_roots: folders or URL prefixes, besides the Parquet file's folder, that paths may point into.
    """

    suffixes = (".parquet",)

    def __init__(self, image_column: str = "jpg", path_column: str = "path", caption_column: str = "caption",
                 key_column: str = "key", batch_rows: int = 256, allowed_roots: Sequence[str] = ()):
        self.image_column, self.path_column = image_column, path_column
        self.caption_column, self.key_column, self.batch_rows = caption_column, key_column, batch_rows
        self.allowed_roots = tuple(allowed_roots)

    def resolve_path(self, path: str, url: str) -> tuple[Optional[str], str]:
        """(where the row's image is, "") or (None, why) when the path leaves the corpus folder and every
        allowed root (``..``, an absolute path, another URL, a symlink out of the folder)."""
        base = posixpath.dirname(url)
        target = _normalise(path if ("://" in path or path.startswith("/")) else posixpath.join(base, path))
        for root in (base, *self.allowed_roots):
            root = _normalise(root).rstrip("/")
            if target == root or target.startswith(root + "/"):
                return target, ""
        return None, (f"{path} resolves to {target}, outside the corpus folder {base} and "
                      "input.parquet.allowed_roots")

    def check_columns(self, names: Sequence[str], url: str) -> None:
        """Raises ValueError naming what is missing when a table has no image or no caption column."""
        if self.image_column not in names and self.path_column not in names:
            raise ValueError(f"{url} has neither image column {self.image_column!r} nor path column "
                             f"{self.path_column!r} (columns: {list(names)}); set input.parquet.image_column "
                             "or input.parquet.path_column")
        if self.caption_column not in names:
            raise ValueError(f"{url} has no caption column {self.caption_column!r} (columns: {list(names)}); set "
                             "input.parquet.caption_column")

    def _open(self, url: str):
        fs, path = fsspec.core.url_to_fs(url)
        f = fs.open(path, "rb")
        return f, pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False)

    def _columns(self, pf, url: str, with_meta: bool) -> list[str]:
        names = pf.schema_arrow.names
        self.check_columns(names, url)
        wanted = [c for c in (self.image_column, self.path_column) if c in names]
        return names if with_meta else wanted

    def _image(self, row: dict, url: str) -> tuple[Optional[bytes], str, str]:
        """(image bytes or None, suffix, problem detail) of one row: bytes from the image column, else the path."""
        value, path = row.get(self.image_column), row.get(self.path_column)
        if isinstance(value, dict):  # Hugging Face datasets' Image feature
            value, path = value.get("bytes"), path or value.get("path")
        if value is not None:
            if not isinstance(value, (bytes, bytearray, memoryview)):
                return None, "", f"column {self.image_column!r} holds a {type(value).__name__}, not image bytes"
            data = bytes(value)
            return data, _sniff_suffix(data) or self._default_suffix(path), ""
        if not path:
            return None, "", "no image bytes and no path"
        target, outside = self.resolve_path(path, url)
        if target is None:
            return None, "", OUTSIDE + outside
        try:
            with fsspec.open(target, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as e:
            return None, "", f"{path}: {error_line(e)}"
        return data, _sniff_suffix(data) or self._default_suffix(path), ""

    def _default_suffix(self, path: Optional[str]) -> str:
        ext = (path or "").rsplit(".", 1)[-1].lower() if path and "." in path else ""
        if ext in IMAGE_EXTENSIONS:
            return ext
        return self.image_column if self.image_column in IMAGE_EXTENSIONS else "jpg"  # decode says not_an_image

    def _key(self, row: dict, stem: str, index: int) -> str:
        key = row.get(self.key_column)
        return str(key) if key is not None and str(key) != "" else f"{stem}_{index:09d}"

    def iter_samples(self, url: str):
        stem = _SANITISE.sub("_", posixpath.basename(url)[: -len(".parquet")])
        index = 0
        try:
            f, pf = self._open(url)
            with f:
                columns = self._columns(pf, url, with_meta=True)
                for batch in pf.iter_batches(batch_size=self.batch_rows, columns=columns, use_threads=False):
                    for row in batch.to_pylist():
                        key = self._key(row, stem, index)
                        offset, index = index, index + 1
                        members, problem = {}, None
                        data, suffix, why = self._image(row, url)
                        if data is not None:
                            members[suffix] = (data, offset, len(data))
                        elif why.startswith("column "):
                            problem = ("not_an_image", why)
                        elif why.startswith(OUTSIDE):
                            problem = ("path_outside_corpus", why[len(OUTSIDE):])
                        elif why != "no image bytes and no path":
                            problem = ("unreadable_image_path", why)
                        caption = row.get(self.caption_column)
                        if caption is not None:
                            raw = bytes(caption) if isinstance(caption, (bytes, bytearray)) else \
                                str(caption).encode("utf-8")
                            members["txt"] = (raw, -1, len(raw))
                        meta = {k: _json_value(v) for k, v in row.items()
                                if k != self.image_column and not isinstance(v, (bytes, bytearray))}
                        text = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                        members["json"] = (text, -1, len(text))
                        try:
                            check_member_name(f"{key}.{suffix or 'jpg'}")
                        except ValueError as e:
                            problem = ("unsafe_member_name", str(e))
                        yield key, members, problem
        except (OSError, ValueError, EOFError) as e:  # pyarrow's errors are OSError / ValueError subclasses
            yield SHARD_KEY, {}, ("unreadable_shard", f"rows from {index} on are unreadable: {error_line(e)}")

    def open_images(self, url: str) -> ImageReader:
        return _ParquetRowReader(self, url)


class _ParquetRowReader(ImageReader):
    """Image bytes of rows by row number, reading the image/path columns forwards one batch at a time,
    starting at the row group that holds the first row asked for (row groups before it are not read)."""

    def __init__(self, source: ParquetSource, url: str):
        self.source, self.url = source, url
        self.f = self.batches = None
        self.start, self.rows = 0, []

    def _reopen(self, row: int):
        self.close()
        self.f, pf = self.source._open(self.url)
        columns = self.source._columns(pf, self.url, with_meta=False)
        starts = [0]
        for i in range(pf.metadata.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(i).num_rows)
        group = max(0, min(bisect.bisect_right(starts, row) - 1, pf.metadata.num_row_groups - 1))
        self.batches = pf.iter_batches(batch_size=self.source.batch_rows, columns=columns, use_threads=False,
                                       row_groups=range(group, pf.metadata.num_row_groups))
        self.start, self.rows = starts[group], []

    def read(self, member: str, offset: int, size: int) -> bytes:
        if self.batches is None or offset < self.start:
            self._reopen(offset)
        while offset >= self.start + len(self.rows):
            self.start += len(self.rows)
            batch = next(self.batches, None)
            if batch is None:
                raise IOError(f"{self.url}: row {offset} not found")
            self.rows = batch.to_pylist()
        data, _, why = self.source._image(self.rows[offset - self.start], self.url)
        if data is None:
            raise IOError(f"{self.url}: row {offset}: {why}")
        return data

    def close(self):
        if self.f is not None:
            self.f.close()
        self.f = self.batches = None


class CorpusInput:
    """The input side of one job: lists units and hands each to the source of its format.

    Args:
        fmt: ``auto`` (by file name ending; a folder holding tar shards is read as tars, so
            img2dataset's per-shard Parquet beside them is ignored) or a registered source name.
        options: per-format constructor arguments, e.g. ``{"parquet": {"image_column": "image"}}``.
    """

    def __init__(self, fmt: str = "auto", options: Optional[dict[str, dict]] = None):
        if fmt != "auto" and fmt not in SOURCES:
            raise ValueError(f"input.format: unknown format {fmt!r}; available: auto, {', '.join(available_sources())}")
        self.fmt = fmt
        built = {name: cls(**(options or {}).get(name, {})) for name, cls in SOURCES.items()}  # validates options
        # keep only the sources this job can select: the object travels to every worker, and a plug-in that
        # can never be chosen (its suffixes claimed by an earlier name) need not be importable there
        claimed: set[str] = set()
        self.sources = {}
        for name in ([fmt] if fmt != "auto" else available_sources()):
            if fmt != "auto" or not claimed.issuperset(SOURCES[name].suffixes):
                self.sources[name] = built[name]
                claimed.update(SOURCES[name].suffixes)

    def source_for(self, url: str) -> CorpusSource:
        if self.fmt != "auto":
            return self.sources[self.fmt]
        for name in available_sources():
            if url.endswith(SOURCES[name].suffixes):
                return self.sources[name]
        raise ValueError(f"input.source: cannot tell the format of {url!r}; set input.format")

    def _formats_in(self, names: list[str]) -> list[str]:
        if self.fmt != "auto":
            return [self.fmt]
        for name in ("tar", *[n for n in available_sources() if n != "tar"]):  # tars first: img2dataset's layout
            if any(p.endswith(SOURCES[name].suffixes) for p in names):
                return [name]
        return []

    def list_units(self, locations: Sequence[str]) -> list[str]:
        """Every unit named by ``locations`` (folders, globs, files; fsspec URLs), sorted, as URLs.

        Raises:
            FileNotFoundError: a location that does not exist or holds no unit of the format.
        """
        found: set[str] = set()
        for src in locations:
            fs, path = fsspec.core.url_to_fs(src)
            if any(ch in path for ch in "*?["):
                paths = fs.glob(path)
            elif fs.isdir(path):
                paths = [p for p in fs.ls(path.rstrip("/"), detail=False)]
            elif fs.exists(path):
                paths = [path]
            else:
                raise FileNotFoundError(f"input.source {src!r} does not exist")
            suffixes = tuple(s for name in self._formats_in(paths) for s in SOURCES[name].suffixes)
            paths = [p for p in paths if suffixes and p.endswith(suffixes)]
            if not paths:
                kinds = "/".join(s for c in SOURCES.values() for s in c.suffixes) if self.fmt == "auto" else \
                    "/".join(SOURCES[self.fmt].suffixes)
                raise FileNotFoundError(f"input.source {src!r} holds no {kinds} file")
            found.update(_protocol_prefix(fs) + p for p in paths)
        return sorted(found)

    def check(self, units: Sequence[str]) -> None:
        """Cheap checks before the job runs: the first Parquet table has the configured columns.

        Raises:
            ValueError: a one-line reason.
        """
        first = next((u for u in units if isinstance(self.source_for(u), ParquetSource)), None)
        if first is not None:
            source = self.source_for(first)
            try:
                f, pf = source._open(first)
                with f:
                    names = pf.schema_arrow.names
            except (OSError, ValueError) as e:
                raise ValueError(f"{first} is not a readable Parquet table: {error_line(e)}") from None
            source.check_columns(names, first)


def corpus_input_from_config(cfg) -> CorpusInput:
    """The ``CorpusInput`` of a ``CorpusInputConfig`` (format + per-format options)."""
    return CorpusInput(cfg.format, {"parquet": cfg.parquet.model_dump()})
