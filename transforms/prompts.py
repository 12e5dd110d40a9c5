"""Read, clean, deduplicate and sample prompts.

Every line or row that is read comes out either as a ``PromptRecord`` or as a
``Drop`` with a reason: non_utf8, invalid_row, control_characters (NUL and other C0/C1 controls but tab,
newline and carriage return, which are whitespace and normalised), empty_prompt, too_long, duplicate,
not_sampled.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Iterator, Optional

import apache_beam as beam
import fsspec

from ..schemas.config import PromptsConfig
from ..schemas.records import Drop, PromptRecord

DROPPED = "dropped"
BUILTIN = "builtin"


@dataclass(frozen=True)
class RawPrompt:
    """One line/row as read, before cleaning. ``text`` is None when it could not be decoded."""

    source: str
    index: int
    text: Optional[str]
    category: str = ""
    error: str = ""

    @property
    def record_id(self) -> str:
        return f"{self.source}#{self.index}"


def normalize_prompt(text: str) -> str:
    """NFC, collapse whitespace, strip."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def prompt_id_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _detect_format(cfg: PromptsConfig) -> str:
    if cfg.format != "auto":
        return cfg.format
    src = cfg.source
    if src == BUILTIN:
        return "jsonl"
    if src.startswith("hf://") and not any(src.endswith(e) for e in (".txt", ".jsonl", ".csv", ".parquet")):
        return "hf"
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".csv", "csv"), (".parquet", "parquet"), (".txt", "txt")):
        if src.endswith(ext) or src.endswith(ext + ".gz"):
            return fmt
    raise ValueError(f"cannot tell the format of prompt source {src!r}: set prompts.format "
                     "(txt, jsonl, csv, parquet or hf)")


def _open_bytes(source: str) -> bytes:
    if source == BUILTIN:
        return resources.files("synpref.jobs").joinpath("builtin_prompts.jsonl").read_bytes()
    with fsspec.open(source, "rb", compression="infer") as f:
        return f.read()


def _row(cfg: PromptsConfig, source: str, index: int, row: dict) -> RawPrompt:
    text = row.get(cfg.text_field)
    if not isinstance(text, str):
        return RawPrompt(source, index, None, error=f"no string field {cfg.text_field!r}")
    return RawPrompt(source, index, text, str(row.get(cfg.category_field) or ""))


def _first_bad_byte(row: dict) -> Optional[int]:
    """The first undecodable byte in a CSV row read with surrogateescape, or None."""
    for value in row.values():
        for v in value if isinstance(value, list) else [value]:
            for ch in v if isinstance(v, str) else "":
                if "\udc80" <= ch <= "\udcff":
                    return ord(ch) - 0xDC00
    return None


def read_raw_prompts(cfg: PromptsConfig) -> Iterator[RawPrompt]:
    """Yield every line/row of the source (runs on a worker)."""
    fmt = _detect_format(cfg)
    src = cfg.source
    if fmt == "hf":
        import datasets

        # hf://<name> or a bare name / local dataset folder with format: hf
        ds = datasets.load_dataset(src[len("hf://"):] if src.startswith("hf://") else src, split=cfg.split)
        for i, row in enumerate(ds):
            yield _row(cfg, src, i, row)
        return
    data = _open_bytes(src)
    if fmt != "parquet" and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]  # Excel and Notepad write one; it would hide the first column/line
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
            yield _row(cfg, src, i, row)
        return
    lines = data.splitlines()
    if fmt == "csv":
        # surrogateescape keeps bad bytes as lone surrogates, so one bad row is dropped, not the whole file.
        text = data.decode("utf-8", errors="surrogateescape")
        for i, row in enumerate(csv.DictReader(io.StringIO(text, newline=""))):
            bad = _first_bad_byte(row)
            yield _row(cfg, src, i, row) if bad is None else RawPrompt(
                src, i, None, error=f"not valid UTF-8: byte 0x{bad:02x} in CSV row")
        return
    for i, raw in enumerate(lines):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawPrompt(src, i, None, error=f"not valid UTF-8: {e}")
            continue
        if fmt == "txt":
            yield RawPrompt(src, i, line)
            continue
        if not line.strip():
            yield RawPrompt(src, i, "")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield RawPrompt(src, i, None, error=f"invalid JSON: {e}")
            continue
        yield _row(cfg, src, i, row) if isinstance(row, dict) else RawPrompt(src, i, None, error="not a JSON object")


class _Clean(beam.DoFn):
    def __init__(self, max_chars: int):
        self.max_chars = max_chars

    def process(self, raw: RawPrompt):
        if raw.text is None:
            reason = "non_utf8" if raw.error.startswith("not valid UTF-8") else "invalid_row"
            yield beam.pvalue.TaggedOutput(DROPPED, Drop("prompt", reason, raw.record_id, "prompts", raw.error))
            return
        control = next(((i, c) for i, c in enumerate(raw.text)
                        if c not in "\t\n\r" and unicodedata.category(c) == "Cc"), None)
        if control:
            yield beam.pvalue.TaggedOutput(DROPPED, Drop(
                "prompt", "control_characters", raw.record_id, "prompts",
                f"control character U+{ord(control[1]):04X} at position {control[0]}"))
            return
        text = normalize_prompt(raw.text)
        if not text:
            yield beam.pvalue.TaggedOutput(DROPPED, Drop("prompt", "empty_prompt", raw.record_id, "prompts"))
        elif len(text) > self.max_chars:
            yield beam.pvalue.TaggedOutput(DROPPED, Drop(
                "prompt", "too_long", raw.record_id, "prompts", f"{len(text)} chars > max_chars={self.max_chars}"))
        else:
            yield PromptRecord(prompt_id_of(text), text, raw.category, raw.source, raw.index)


def _first_of_duplicates(element):
    """Keep the earliest occurrence of a prompt; the others are dropped as duplicates."""
    _, records = element
    records = sorted(records, key=lambda r: (r.source, r.source_index))
    yield records[0]
    for r in records[1:]:
        yield beam.pvalue.TaggedOutput(DROPPED, Drop(
            "prompt", "duplicate", f"{r.source}#{r.source_index}", "prompts", f"same as line {records[0].source_index}"))


def sample_key(seed: int, prompt_id: str) -> str:
    return hashlib.sha256(f"{seed}:{prompt_id}".encode()).hexdigest()


def _boundary(counts: list, n: int) -> Optional[tuple[str, int]]:
    """(bucket, rank): the prefix bucket holding the ``n``-th smallest sample key and that key's rank (1-based)
    inside it, from the per-bucket counts; None when there are at most ``n`` prompts (all are kept)."""
    seen = 0
    for bucket, count in sorted(counts):
        if seen + count >= n:
            return bucket, n - seen
        seen += count
    return None


def _in_boundary_bucket(key: str, boundary: Optional[tuple[str, int]]):
    if boundary is not None and key.startswith(boundary[0]):
        yield key


def _nth_smallest(keys: list, boundary: Optional[tuple[str, int]]) -> Optional[str]:
    return None if boundary is None else sorted(keys)[boundary[1] - 1]


class SeededSample(beam.PTransform):
    """PromptRecords -> the ``n`` whose ``sample_key(seed, prompt_id)`` is smallest (the same set as sorting
    every key), streamed: no step holds all prompts or all keys.

    Keys are uniform hex digests, so their first ``bucket_hex`` digits cut them into 16**bucket_hex ordered
    buckets of about the same size. One pass counts prompts per bucket (at most 16**bucket_hex numbers);
    the cumulative counts name the bucket holding the ``n``-th smallest key and its rank there; only that
    bucket's keys (about 1/65536 of the prompts by default) are gathered to find that key, the threshold.
    A prompt is sampled iff its key <= the threshold (hex digests of equal length order as numbers). Same
    seed and prompts: same sample, on any runner.
    """

    def __init__(self, n: int, seed: int, bucket_hex: int = 4):
        super().__init__()
        self.n, self.seed, self.bucket_hex = n, seed, bucket_hex

    def expand(self, prompts):
        n, seed, width = self.n, self.seed, self.bucket_hex
        keys = prompts | "SampleKeys" >> beam.Map(lambda r: sample_key(seed, r.prompt_id))
        boundary = (keys
                    | "ByBucket" >> beam.Map(lambda k: (k[:width], 1))
                    | "CountPerBucket" >> beam.CombinePerKey(sum)
                    | "AllBucketCounts" >> beam.combiners.ToList()  # at most 16**bucket_hex pairs
                    | "Boundary" >> beam.Map(_boundary, n))
        threshold = (keys
                     | "BoundaryBucket" >> beam.FlatMap(_in_boundary_bucket, beam.pvalue.AsSingleton(boundary))
                     | "ItsKeys" >> beam.combiners.ToList()
                     | "Threshold" >> beam.Map(_nth_smallest, beam.pvalue.AsSingleton(boundary)))
        return prompts | "KeepSampled" >> beam.ParDo(
            _split_sampled, seed, beam.pvalue.AsSingleton(threshold)).with_outputs(DROPPED, main="ok")


def _split_sampled(record: PromptRecord, seed: int, threshold: Optional[str]):
    if threshold is None or sample_key(seed, record.prompt_id) <= threshold:
        yield record
    else:
        yield beam.pvalue.TaggedOutput(DROPPED, Drop(
            "prompt", "not_sampled", f"{record.source}#{record.source_index}", "prompts"))


class ReadPrompts(beam.PTransform):
    """Source -> cleaned, unique, sampled ``PromptRecord``s.

    Returns ``{"prompts", "dropped", "read"}`` where ``read`` is every raw line/row.
    Sampling takes the ``num_prompts`` prompts with the smallest sha256(seed:prompt_id):
    a seeded sample that does not depend on input order or runner (``SeededSample``: streamed).
    """

    def __init__(self, cfg: PromptsConfig, seed: int):
        super().__init__()
        self.cfg, self.seed = cfg, seed

    def expand(self, pbegin):
        cfg, seed = self.cfg, self.seed
        raw = (pbegin | "Source" >> beam.Create([cfg])
               | "ReadLines" >> beam.FlatMap(read_raw_prompts)
               | "Rebalance" >> beam.Reshuffle())
        cleaned = raw | "Clean" >> beam.ParDo(_Clean(cfg.max_chars)).with_outputs(DROPPED, main="ok")
        unique = (cleaned.ok
                  | "KeyByContent" >> beam.Map(lambda r: (r.prompt_id, r))
                  | "GroupDuplicates" >> beam.GroupByKey()
                  | "Dedupe" >> beam.ParDo(_first_of_duplicates).with_outputs(DROPPED, main="ok"))
        dropped = [cleaned[DROPPED], unique[DROPPED]]
        prompts = unique.ok
        if cfg.num_prompts is not None:
            split = prompts | "SeededSample" >> SeededSample(cfg.num_prompts, seed)
            prompts = split.ok
            dropped.append(split[DROPPED])
        return {"prompts": prompts, "dropped": dropped | "PromptDrops" >> beam.Flatten(), "read": raw}
