"""Write a filter run's outputs: the kept samples as WebDataset shards, and every sample's outcome.

Output shard rule (streaming, deterministic on any runner): the kept samples of input shard ``i``, in
their input order (position in the shard), are cut into runs of ``samples_per_shard``; run ``j`` is
``shards/filtered-{i:05d}-{j:05d}.tar``. Nothing global decides it: the shard of a sample is a
function of its input shard, its position there and which earlier samples of the same input shard were
kept, all of which are fixed by the input and the config, whatever the runner, worker count or bundle
order. A step holds one input shard's kept records (no pixels) at a time, so memory per worker is
bounded by one input shard, never by the corpus. An input shard with nothing kept writes no tar; the
last tar of an input shard may hold fewer samples.

Outcomes: per input shard a Parquet index of every sample (kept or not, with reason) and a dead-letter
JSONL of the dropped ones, both sorted by key, so bytes do not depend on the runner either.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from ..schemas.records import CorpusRecord
from .corpus_sources import SHARD_KEY, CorpusInput
from ..core.fileio import AtomicFile
from .imageio import check_member_name
from ..core.fileio import canonical_json, sha256_of
from .writing import TAR_MTIME


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


def filtered_shard_name(input_index: int, part: int) -> str:
    """The name of the ``part``-th output tar cut from input shard ``input_index``."""
    return f"filtered-{input_index:05d}-{part:05d}"


def input_order(rec: CorpusRecord):
    """Where a record was in its input shard (offsets grow through a tar; Parquet offsets are row numbers)."""
    return rec.offset, rec.key


def encode_key(key: str) -> str:
    """A key every WebDataset reader splits back whole: readers cut a member name at its first dot, so
    ``x.y.z.jpg`` would read as key ``x``. ``%`` -> ``%25``, ``.`` -> ``%2E`` (``urllib.parse.unquote``
    reverses it); a key without either is written as it is. The original is in the JSON's
    ``synpref_source.key``."""
    return key.replace("%", "%25").replace(".", "%2E")


def output_sample(rec: CorpusRecord, image: bytes) -> dict[str, bytes]:
    """The kept sample as written: key (``encode_key``), image bytes and caption bytes; the original JSON with
    ``synpref_scores`` and ``synpref_source`` (its shard, member, sha256 and original key) added."""
    meta = json.loads(rec.metadata) if rec.metadata else {}
    meta["synpref_scores"] = dict(sorted(rec.scores.items()))
    meta["synpref_source"] = {"shard": rec.source_shard, "member": rec.image_member, "sha256": rec.image_sha256,
                              **({"key": rec.key} if encode_key(rec.key) != rec.key else {})}
    suffix = rec.image_member[len(rec.key) + 1:]
    key = encode_key(rec.key)
    sample = {"__key__": key, suffix: image, "txt": rec.caption_bytes, "json": canonical_json(meta)}
    for ext in sample:
        if ext != "__key__":
            check_member_name(f"{key}.{ext}")
    return sample


class _WriteInputShard(beam.DoFn):
    """(input shard index, its kept records) -> one stats dict per output tar written."""

    def __init__(self, output_dir: str, samples_per_shard: int, corpus_input: Optional[CorpusInput] = None):
        self.output_dir, self.per_shard = output_dir.rstrip("/"), samples_per_shard
        self.corpus_input = corpus_input or CorpusInput()

    def process(self, element):
        index, records = element
        records = sorted(records, key=input_order)
        url = records[0].source_shard  # one input shard: one source unit, read forwards
        reader = self.corpus_input.source_for(url).open_images(url)
        try:
            for part, start in enumerate(range(0, len(records), self.per_shard)):
                yield self._write(filtered_shard_name(index, part), records[start:start + self.per_shard], reader)
        finally:
            reader.close()

    def _write(self, name: str, records: list, reader) -> dict:
        tar_path = f"{self.output_dir}/shards/{name}.tar"
        with AtomicFile(tar_path) as f, wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as tar:
            for rec in records:
                data = reader.read(rec.image_member, rec.offset, rec.size)
                if hashlib.sha256(data).hexdigest() != rec.image_sha256:
                    raise IOError(f"{rec.source_shard} changed while filtering: {rec.image_member} no longer "
                                  "has the bytes that were scored; rerun")
                tar.write(output_sample(rec, data))
        fs, path = fsspec.core.url_to_fs(tar_path)
        return {"shard": name, "tar": f"shards/{name}.tar", "samples": len(records), "size": fs.size(path),
                "sha256": sha256_of(tar_path), "first_key": records[0].key, "last_key": records[-1].key}


class WriteFiltered(beam.PTransform):
    """Kept CorpusRecords -> ``shards/filtered-IIIII-JJJJJ.tar`` (the module docstring's rule), one
    shuffle keyed by input shard."""

    def __init__(self, output_dir: str, samples_per_shard: int, corpus_input: Optional[CorpusInput] = None):
        super().__init__()
        self.output_dir, self.per_shard, self.corpus_input = output_dir, samples_per_shard, corpus_input

    def expand(self, kept):
        return (kept
                | "ByInputShard" >> beam.Map(lambda r: (r.shard_index, r))
                | "GroupByInputShard" >> beam.GroupByKey()
                | "WriteShards" >> beam.ParDo(_WriteInputShard(self.output_dir, self.per_shard, self.corpus_input)))


class WriteShardSizes(beam.DoFn):
    """``shards/sizes.json``: {tar file name: samples} over every output tar, the file open_clip's trainer
    (``open_clip_train.data.get_dataset_size``) reads for the dataset's length, so a filter output trains
    without ``--train-num-samples``. Holds one small dict per output tar, never per sample."""

    def __init__(self, output_dir: str):
        self.path = f"{output_dir.rstrip('/')}/shards/sizes.json"

    def process(self, _, shards: list):
        sizes = {s["tar"].rsplit("/", 1)[-1]: s["samples"] for s in shards}
        with AtomicFile(self.path) as f:
            f.write(canonical_json(dict(sorted(sizes.items()))))
        yield "shards/sizes.json"


def index_schema(reward_names: Sequence[str]) -> pa.Schema:
    return pa.schema([
        ("key", pa.string()), ("source_shard", pa.string()), ("image_member", pa.string()),
        ("image_offset", pa.int64()), ("image_size", pa.int64()),  # where the source's reader finds the image
        ("sha256", pa.string()), ("dhash", pa.string()), ("caption", pa.string()), ("width", pa.int64()),
        ("height", pa.int64()),
        *[(f"score_{n}", pa.float64()) for n in reward_names],
        ("kept", pa.bool_()), ("reason", pa.string()), ("stage", pa.string()), ("detail", pa.string()),
    ])


class _WriteOutcomes(beam.DoFn):
    def __init__(self, output_dir: str, reward_names: Sequence[str]):
        self.output_dir, self.names = output_dir.rstrip("/"), list(reward_names)

    def process(self, element):
        index, records = element
        records = sorted(records, key=lambda r: (r.key == SHARD_KEY, r.key, r.reason))
        rows = [{"key": r.key, "source_shard": r.source_shard, "image_member": r.image_member,
                 "image_offset": r.offset, "image_size": r.size,
                 "sha256": r.image_sha256, "dhash": r.dhash, "caption": r.caption, "width": r.width, "height": r.height,
                 **{f"score_{n}": r.scores.get(n) for n in self.names},
                 "kept": r.kept, "reason": r.reason, "stage": r.dropped.stage if r.dropped else "",
                 "detail": r.dropped.detail if r.dropped else ""} for r in records]
        index_path = f"{self.output_dir}/index/{shard_name('samples', index)}.parquet"
        with AtomicFile(index_path) as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=index_schema(self.names)), f)
        drops_path = f"{self.output_dir}/dead_letter/{shard_name('drops', index)}.jsonl"
        lines = [r.dropped.to_json() for r in records if not r.kept]
        with AtomicFile(drops_path) as f:
            f.write("".join(line + "\n" for line in lines).encode("utf-8"))
        yield {"index": index_path[len(self.output_dir) + 1:], "dead_letter": drops_path[len(self.output_dir) + 1:]}


class WriteOutcomes(beam.PTransform):
    """Every record (kept or dropped) -> per input shard an index Parquet and a dead-letter JSONL."""

    def __init__(self, output_dir: str, reward_names: Sequence[str]):
        super().__init__()
        self.output_dir, self.names = output_dir, list(reward_names)

    def expand(self, records):
        return (records
                | "ByInputShard" >> beam.Map(lambda r: (r.shard_index, r))
                | "GroupByInputShard" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(_WriteOutcomes(self.output_dir, self.names)))
