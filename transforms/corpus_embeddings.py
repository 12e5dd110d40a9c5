"""Embed corpus images once, through RunInference, and keep the embeddings as Parquet beside the output.

Records reach this step without pixels, so it reads each image's bytes again from its input shard (as the
writer does: one reader per input shard, forwards, sha256 checked against the scored bytes), decodes it
(pixel limit; at draft size with ``input.jpeg_draft`` when the embedder shrinks images first) and embeds
chunks of ``batch_size`` through the build's ``PluginModelHandler`` (one model per worker or
``model_copies`` per machine, an ``accelerator`` hint, failures dropped as ``embedding_error``).

Per input shard ``i`` the embeddings are written to ``embeddings/embeddings-{i:05d}.parquet`` (columns key,
source_shard, shard_index, image_member, image_sha256, embedding; rows sorted by key; the schema metadata
``synpref_embedding_key`` is a digest of the embedder's ``describe()`` and the decode settings). A rerun
(another threshold, other clusters, other filters) reuses a row when the file's key matches and the row's
key and image sha256 equal the record's, and embeds only the rest; a changed embedder, weight file or
decode setting is another key, so nothing stale is read. A file is rewritten only when its rows would change.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference

from ..core.errors import error_line
from ..core.fileio import AtomicFile
from .corpus_scoring import DROPPED
from .corpus_sources import CorpusInput
from .corpus_writing import input_order, shard_name
from .embedders import Embedder, create_embedder
from .imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from .inference import PluginModelHandler, Work
from .model_io import json_digest

REUSED = "reused"
KEY_METADATA = b"synpref_embedding_key"

SCHEMA = pa.schema([("key", pa.string()), ("source_shard", pa.string()), ("shard_index", pa.int64()),
                    ("image_member", pa.string()), ("image_sha256", pa.string()),
                    ("embedding", pa.list_(pa.float32()))])


def embeddings_path(output_dir: str, shard_index: int) -> str:
    return f"{output_dir.rstrip('/')}/embeddings/{shard_name('embeddings', shard_index)}.parquet"


def embedding_key(embedder: Embedder, max_pixels: int, jpeg_draft: bool) -> str:
    """What an embedding depends on besides the image bytes."""
    return json_digest({"format": 1, "embedder": embedder.describe(), "max_pixels": max_pixels,
                        "jpeg_draft": jpeg_draft})


def embedding_matrix(table: pa.Table) -> np.ndarray:
    """The ``embedding`` column as an (n, dim) float32 array, without a Python float per entry."""
    column = table.column("embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), np.float32)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(column), -1)


def embedding_array(vectors: Sequence[np.ndarray]) -> pa.Array:
    """(n, dim) rows as the file's list<float32> column."""
    values = np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors])
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in vectors])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float32()))


def read_embeddings(path: str, key: str) -> Optional[pa.Table]:
    """The file's table if it exists, is readable and was written under ``key``; else None."""
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        return None
    try:
        with fs.open(p, "rb") as f:
            table = pq.read_table(f)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return table if (table.schema.metadata or {}).get(KEY_METADATA) == key.encode() else None


class _PlanShard(beam.DoFn):
    """(input shard index, its records) -> reused (shard, (record, embedding, row unchanged)) tagged
    ``reused``, and chunks of (record, image bytes) to embed, in input order."""

    def __init__(self, output_dir: str, key: str, corpus_input: CorpusInput, chunk_size: int):
        self.output_dir, self.key, self.corpus_input, self.chunk_size = output_dir, key, corpus_input, chunk_size

    def process(self, element):
        index, records = element
        records = sorted(records, key=input_order)
        table = read_embeddings(embeddings_path(self.output_dir, index), self.key)
        known = {}
        if table is not None:
            vectors = embedding_matrix(table)
            columns = ("key", "image_sha256", "source_shard", "image_member")
            for row, (k, sha, src, member) in enumerate(zip(*(table.column(c).to_pylist() for c in columns))):
                known[k] = (sha, (src, member), vectors[row])
        todo = []
        for rec in records:
            hit = known.get(rec.key)
            if hit is not None and hit[0] == rec.image_sha256:  # same bytes, same embedder: same embedding
                Metrics.counter("synpref", "embeddings_reused").inc()
                same_row = hit[1] == (rec.source_shard, rec.image_member)  # else the file is rewritten
                yield beam.pvalue.TaggedOutput(REUSED, (index, (rec, hit[2], same_row)))
            else:
                todo.append(rec)
        if not todo:
            return
        reader = self.corpus_input.source_for(todo[0].source_shard).open_images(todo[0].source_shard)
        try:
            chunk = []
            for rec in todo:
                data = reader.read(rec.image_member, rec.offset, rec.size)
                if hashlib.sha256(data).hexdigest() != rec.image_sha256:
                    raise IOError(f"{rec.source_shard} changed while filtering: {rec.image_member} no longer has "
                                  "the bytes that were scored; rerun")
                chunk.append((rec, data))
                if len(chunk) >= self.chunk_size:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk
        finally:
            reader.close()


class EmbedImages(Work):
    """Decode and embed a call's chunks; per chunk a list of (record, embedding) or (dropped record, None)."""

    stage, unit = "embed", "samples"

    def __init__(self, name: str, params: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS,
                 jpeg_draft: bool = False):
        self.name, self.params, self.max_pixels, self.jpeg_draft = name, dict(params), max_pixels, jpeg_draft

    def load(self) -> Embedder:
        embedder = create_embedder(self.name, self.params)
        embedder.load()
        return embedder

    def size(self, chunk: list) -> int:
        return len(chunk)

    def run(self, model: Embedder, batch: Sequence[list]) -> list:
        draft = model.draft_side() if self.jpeg_draft else 0
        decoded = []
        for chunk in batch:
            for rec, data in chunk:
                try:
                    decoded.append((rec, decode_image(data, self.max_pixels, draft_min_side=draft)))
                except ImageDecodeError as e:
                    decoded.append((rec.drop(e.reason, "embed", e.detail), None))
        ok = [i for i, (_, image) in enumerate(decoded) if image is not None]
        vectors = model.embed([decoded[i][1] for i in ok]) if ok else np.zeros((0, 0), np.float32)
        Metrics.counter("synpref", "embeddings_computed").inc(len(ok))
        rows: list = [(rec, None) for rec, _ in decoded]
        for j, i in enumerate(ok):
            rows[i] = (decoded[i][0], np.asarray(vectors[j], dtype=np.float32))
        out, start = [], 0
        for chunk in batch:
            out.append(rows[start:start + len(chunk)])
            start += len(chunk)
        return out


def _computed(result):  # (shard, (record, embedding or None, row unchanged))
    for rec, emb in result.inference:
        yield rec.shard_index, (rec, emb, False)


def _failed_chunks(failure):
    batch, exc = failure
    for chunk in batch:
        for rec, _ in chunk:
            yield rec.shard_index, (rec.drop("embedding_error", "embed", error_line(exc)), None, False)


def _rows_in(path: str) -> int:
    fs, p = fsspec.core.url_to_fs(path)
    with fs.open(p, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


class _WriteShard(beam.DoFn):
    """(input shard index, its (record, embedding, reused)) -> (record, embedding); dropped records tagged.

    Writes the shard's embeddings file unless every row came from the existing file and it holds no other."""

    def __init__(self, output_dir: str, key: str, describe: dict):
        self.output_dir, self.key, self.describe = output_dir, key, describe

    def process(self, element):
        index, items = element
        items = sorted(items, key=lambda it: it[0].key)
        good = [(rec, emb, reused) for rec, emb, reused in items if emb is not None]
        path = embeddings_path(self.output_dir, index)
        if good and not (all(reused for _, _, reused in good) and _rows_in(path) == len(good)):
            records = [r for r, _, _ in good]
            table = pa.Table.from_arrays(
                [pa.array([r.key for r in records], pa.string()),
                 pa.array([r.source_shard for r in records], pa.string()),
                 pa.array([r.shard_index for r in records], pa.int64()),
                 pa.array([r.image_member for r in records], pa.string()),
                 pa.array([r.image_sha256 for r in records], pa.string()),
                 embedding_array([e for _, e, _ in good])],
                schema=SCHEMA.with_metadata({KEY_METADATA: self.key.encode(),
                                             b"synpref_embedder": json.dumps(self.describe, sort_keys=True).encode()}))
            with AtomicFile(path) as f:
                pq.write_table(table, f)
        for rec, emb, _ in items:
            if emb is None:
                Metrics.counter("synpref", f"filter_drop_{rec.reason}").inc()
                yield beam.pvalue.TaggedOutput(DROPPED, rec)
            else:
                yield rec, emb


class EmbedCorpus(beam.PTransform):
    """CorpusRecords -> {"embedded": (record, unit float32 embedding), "dropped": records that could not be
    embedded}; writes ``embeddings/embeddings-IIIII.parquet`` (the module docstring)."""

    def __init__(self, name: str, params: dict[str, Any], output_dir: str, corpus_input: Optional[CorpusInput] = None,
                 *, batch_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS, jpeg_draft: bool = False,
                 torch_threads: int = 1, model_copies: int = 0, accelerator: str = ""):
        super().__init__()
        self.embedder = create_embedder(name, params, "filter.semantic_dedup.embedder")  # bad params fail here
        self.name, self.params, self.output_dir = name, dict(params), output_dir.rstrip("/")
        self.corpus_input = corpus_input or CorpusInput()
        self.batch_size, self.max_pixels, self.jpeg_draft = batch_size, max_pixels, jpeg_draft
        self.threads, self.model_copies, self.accelerator = torch_threads, model_copies, accelerator

    def expand(self, records):
        key = embedding_key(self.embedder, self.max_pixels, self.jpeg_draft)
        planned = (records
                   | "ByInputShard" >> beam.Map(lambda r: (r.shard_index, r))
                   | "GroupByInputShard" >> beam.GroupByKey()
                   | "ReuseOrRead" >> beam.ParDo(_PlanShard(self.output_dir, key, self.corpus_input, self.batch_size))
                   .with_outputs(REUSED, main="chunks"))
        handler = PluginModelHandler(EmbedImages(self.name, self.params, self.max_pixels, self.jpeg_draft),
                                     f"embed_{self.name}", batch_size=1, model_copies=self.model_copies,
                                     torch_threads=self.threads)
        embed = RunInference(handler)
        if self.accelerator:
            embed = embed.with_resource_hints(accelerator=self.accelerator)
        inference, failures = planned.chunks | "Embed" >> embed.with_exception_handling()
        computed = inference | "Computed" >> beam.FlatMap(_computed)
        failed = failures.failed_inferences | "EmbeddingErrors" >> beam.FlatMap(_failed_chunks)
        written = ((planned[REUSED], computed, failed)
                   | "AllEmbeddings" >> beam.Flatten()
                   | "ByShard" >> beam.GroupByKey()
                   | "WriteEmbeddings" >> beam.ParDo(_WriteShard(self.output_dir, key, self.embedder.describe()))
                   .with_outputs(DROPPED, main="embedded"))
        return {"embedded": written.embedded, "dropped": written[DROPPED]}
