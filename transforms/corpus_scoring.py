"""Read a web corpus's shards and score every sample through the build's RunInference handler.

``ReadShards`` (one call per input shard) reads raw members (never unpickles), groups them into samples
by key, checks member names, caption (UTF-8, not empty) and metadata (a JSON object), and yields
*chunks*: ``input.batch_size`` consecutive samples of one shard, each a ``(CorpusRecord, image bytes)``.
``ScoreCorpus`` sends the chunks through ``RunInference`` with the build's ``PluginModelHandler`` and
``ScoreWithEnsemble`` loader (``transforms/scoring.py``): one ensemble per worker (or
``model_copies`` per machine), ``units_per_call`` chunks per call, the rewards' ``accelerator`` hint,
and a call that raises drops its samples as ``scoring_error`` instead of failing the job. Inside a
call each image is decoded (pixel limit from the header; at draft size with ``input.jpeg_draft``),
scored and released: records leave this step with scores, sha256 and the image's location, never
pixels. A chunk never spans shards and, with ``units_per_call: 1`` (the default), one call scores
exactly one chunk, so scores do not depend on how a runner bundles work. With a ``cache_dir``, each
chunk's results are cached as soon as it is scored and a rerun scores only uncached chunks
(``transforms/corpus_cache.py``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
from typing import Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import RunInference
from PIL import Image

from ..core.progress import progress
from ..schemas.config import RewardConfig
from ..schemas.records import CorpusRecord
from .corpus_cache import CACHED, LIVE, chunk_key, chunk_path, read_chunk, scoring_key, write_chunk
from .corpus_sources import CorpusInput
from .generation import error_line
from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from .inference import PluginModelHandler
from .perceptual_hash import dhash_hex as dhash  # 16 hex digits
from .rewards import create_reward
from .scoring import LoadedRewards, ScoreWithEnsemble

DROPPED = "dropped"
READ = "read"

def draft_side(rewards) -> tuple[int, str]:
    """(side, why): the short side a JPEG may be decoded down to for every reward (0 if some reward
    reads pixels at full resolution, e.g. sharpness or resolution, with the reason). ``rewards``:
    Reward objects or (name, side) pairs (``LoadedRewards.decode_min_sides()``); see
    ``Reward.decode_min_side``."""
    sides = []
    for r in rewards:
        name, side = r if isinstance(r, tuple) else (r.name, r.decode_min_side())
        if not side:
            return 0, f"reward {name} reads pixels at full resolution"
        sides.append(side)
    return max(sides), ""


def check_sample(rec: CorpusRecord, members: dict, problem, max_caption_chars: int = 0):
    """(record, image bytes) of a usable sample, or (record dropped with a reason, None). No decoding."""
    if problem:
        return rec.drop(problem[0], "read", problem[1]), None
    image_suffix = next((s for s in sorted(members, key=lambda s: (s.lower() not in IMAGE_EXTENSIONS, s))
                         if s.lower() in IMAGE_EXTENSIONS), None)
    if image_suffix is None:
        return rec.drop("missing_image", "read", f"members: {sorted(members)}"), None
    data, offset, size = members[image_suffix]
    rec = dataclasses.replace(rec, image_member=f"{rec.key}.{image_suffix}", offset=offset, size=size,
                              image_sha256=hashlib.sha256(data).hexdigest())
    if "txt" not in members:
        return rec.drop("missing_caption", "read", "no .txt member"), None
    raw = members["txt"][0]
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return rec.drop("non_utf8_caption", "read", str(e)), None
    rec = dataclasses.replace(rec, caption=caption, caption_bytes=raw)
    if not caption.strip():
        return rec.drop("empty_caption", "read", f"{len(raw)} bytes of whitespace"), None
    if max_caption_chars and len(caption) > max_caption_chars:
        return rec.drop("caption_too_long", "read", f"{len(caption)} > {max_caption_chars} chars"), None
    if "json" in members:
        try:
            text = members["json"][0].decode("utf-8")
            meta = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            return rec.drop("invalid_metadata", "read", error_line(e)), None
        if not isinstance(meta, dict):
            return rec.drop("invalid_metadata", "read", f"json is a {type(meta).__name__}, not an object"), None
        rec = dataclasses.replace(rec, metadata=text)
    return rec, data


class ReadShards(beam.DoFn):
    """(shard index, URL) -> chunks of ``chunk_size`` (CorpusRecord, image bytes) in input order;
    samples unusable as read are tagged ``dropped``; the shard's sample count is tagged ``read``."""

    def __init__(self, corpus_input: Optional[CorpusInput] = None, chunk_size: int = 16,
                 max_caption_chars: int = 0, total_shards: Optional[int] = None, cache_dir: Optional[str] = None,
                 scoring_key: str = ""):
        self.corpus_input = corpus_input or CorpusInput()
        self.chunk_size, self.max_caption_chars, self.total_shards = chunk_size, max_caption_chars, total_shards
        self.cache_dir, self.scoring_key = cache_dir, scoring_key

    def _emit(self, chunk: list):
        """The chunk for scoring, or (resume) its cached records, tagged ``cached``; its cache key, tagged ``live``."""
        cached = None
        if self.cache_dir:
            path = chunk_path(self.cache_dir, self.scoring_key, chunk)
            yield beam.pvalue.TaggedOutput(LIVE, chunk_key(path))
            cached = read_chunk(path, chunk)
        if cached is None:
            yield chunk
        else:
            for rec in cached:
                yield beam.pvalue.TaggedOutput(CACHED, rec)

    def process(self, element):
        index, url = element
        n, chunk = 0, []
        for key, members, problem in self.corpus_input.source_for(url).iter_samples(url):
            n += 1
            rec, data = check_sample(CorpusRecord(key=key, shard_index=index, source_shard=url), members, problem,
                                     self.max_caption_chars)
            members = None
            if data is None:
                Metrics.counter("synpref", f"filter_drop_{rec.reason}").inc()
                yield beam.pvalue.TaggedOutput(DROPPED, rec)
                continue
            chunk.append((rec, data))
            if len(chunk) >= self.chunk_size:
                yield from self._emit(chunk)
                chunk = []
        if chunk:
            yield from self._emit(chunk)
        progress("read", self.total_shards, "shards").update()
        yield beam.pvalue.TaggedOutput(READ, n)


class ScoreCorpusSamples(ScoreWithEnsemble):
    """The build's ensemble ``Work`` for corpus chunks: decode each image inside the call, score the
    ensemble once over the call, and return per chunk its records, scored or dropped with a reason."""

    stage, unit = "score", "samples"

    def __init__(self, configs: Sequence[RewardConfig], max_pixels: int = DEFAULT_MAX_PIXELS,
                 perceptual_hash: bool = True, jpeg_draft: bool = False):
        super().__init__(configs)
        self.max_pixels, self.perceptual_hash, self.jpeg_draft = max_pixels, perceptual_hash, jpeg_draft
        self._draft: Optional[int] = None

    def _draft_side(self, model: LoadedRewards) -> int:
        if self._draft is None:
            self._draft = 0
            if self.jpeg_draft:
                self._draft, why = draft_side(model.decode_min_sides())
                if not self._draft:
                    logging.getLogger("synpref.filter").warning("input.jpeg_draft: %s; decoding at full size", why)
        return self._draft

    def _decode(self, rec: CorpusRecord, data: bytes, draft: int):
        try:
            image = decode_image(data, self.max_pixels, draft_min_side=draft)
        except ImageDecodeError as e:
            return rec.drop(e.reason, "decode", e.detail), None
        width, height = Image.open(io.BytesIO(data)).size if draft else image.size  # the original's
        return dataclasses.replace(rec, width=width, height=height,
                                   dhash=dhash(image) if self.perceptual_hash else ""), image

    def run(self, model: LoadedRewards, batch: Sequence[list]) -> list:
        draft = self._draft_side(model)
        decoded = [self._decode(rec, data, draft) for chunk in batch for rec, data in chunk]
        ok = [i for i, (_, image) in enumerate(decoded) if image is not None]
        scores = model.score([decoded[i][1] for i in ok], [decoded[i][0].caption for i in ok]) if ok else {}
        failed = next(((name, s) for name, s in scores.items() if isinstance(s, str)), None)
        records = [rec for rec, _ in decoded]
        del decoded  # the pixels end here
        for j, i in enumerate(ok):
            rec = records[i]
            if failed:
                records[i] = rec.drop("scoring_error", f"score:{failed[0]}", failed[1])
                continue
            rec = dataclasses.replace(rec, scores={name: s[j] for name, s in scores.items()})
            bad = sorted(n for n, s in rec.scores.items() if not math.isfinite(s))
            records[i] = rec.drop("nan_score", f"score:{bad[0]}", "non-finite score from " + ", ".join(bad)) \
                if bad else rec
        out, start = [], 0
        for chunk in batch:
            out.append(records[start:start + len(chunk)])
            start += len(chunk)
        return out


def _route(result, cache_dir: Optional[str], key: str):
    if cache_dir:
        write_chunk(chunk_path(cache_dir, key, result.example), result.inference)
    yield from _route_records(result.inference)


def _route_one(rec):
    yield from _route_records([rec])


def _route_records(records):
    for rec in records:
        if rec.kept:
            yield rec
        else:
            Metrics.counter("synpref", f"filter_drop_{rec.reason}").inc()
            yield beam.pvalue.TaggedOutput(DROPPED, rec)


def _failed_chunks(failure):
    batch, exc = failure
    for chunk in batch:
        for rec, _ in chunk:
            yield rec.drop("scoring_error", "score", error_line(exc))


class ScoreCorpus(beam.PTransform):
    """(shard index, URL) -> {"scored": CorpusRecords with scores, "dropped": dropped records,
    "read": samples read per shard, "live": the cache key of every chunk (with a ``cache_dir``)}. Every sample read is in exactly one of scored and dropped."""

    def __init__(self, rewards: Sequence[RewardConfig], corpus_input: Optional[CorpusInput] = None, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 16, max_caption_chars: int = 0,
                 torch_threads: int = 1, perceptual_hash: bool = True, jpeg_draft: bool = False,
                 total_shards: Optional[int] = None, cache_dir: Optional[str] = None):
        super().__init__()
        self.cache_dir = cache_dir  # None: no resume (transforms/corpus_cache.py)
        self.rewards, self.corpus_input = list(rewards), corpus_input
        self.max_pixels, self.batch_size, self.max_caption_chars = max_pixels, batch_size, max_caption_chars
        self.threads, self.perceptual_hash, self.jpeg_draft = torch_threads, perceptual_hash, jpeg_draft
        self.total_shards = total_shards

    def scoring_key(self) -> str:
        """What decides a chunk's scoring results, besides the chunk's samples (the resume cache key)."""
        return scoring_key([create_reward(c.name, c.params).describe() for c in self.rewards], {
            "cache_format": 1, "max_pixels": self.max_pixels, "max_caption_chars": self.max_caption_chars,
            "jpeg_draft": self.jpeg_draft, "perceptual_hash": self.perceptual_hash, "chunk": self.batch_size,
            "chunks_per_call": min(r.units_per_call for r in self.rewards)})

    def expand(self, shards):
        key = self.scoring_key() if self.cache_dir else ""
        read = shards | "ReadShards" >> beam.ParDo(ReadShards(
            self.corpus_input, self.batch_size, self.max_caption_chars, self.total_shards, self.cache_dir,
            key)).with_outputs(DROPPED, READ, CACHED, LIVE, main="chunks")
        work = ScoreCorpusSamples(self.rewards, self.max_pixels, self.perceptual_hash, self.jpeg_draft)
        names = ",".join(r.name for r in self.rewards)
        handler = PluginModelHandler(work, f"score_{names}", batch_size=min(r.units_per_call for r in self.rewards),
                                     model_copies=max(r.model_copies for r in self.rewards),
                                     torch_threads=self.threads)
        score = RunInference(handler)
        accelerator = next((r.accelerator for r in self.rewards if r.accelerator), "")
        if accelerator:
            score = score.with_resource_hints(accelerator=accelerator)
        inference, failures = read.chunks | "Score" >> score.with_exception_handling()
        routed = inference | "Route" >> beam.FlatMap(_route, self.cache_dir, key).with_outputs(DROPPED, main="scored")
        cached = read[CACHED] | "RouteCached" >> beam.FlatMap(_route_one).with_outputs(DROPPED, main="scored")
        failed = failures.failed_inferences | "ScoringErrors" >> beam.FlatMap(_failed_chunks)
        dropped = (read[DROPPED], routed[DROPPED], cached[DROPPED], failed) | "ScoringDrops" >> beam.Flatten()
        return {"scored": (routed.scored, cached.scored) | "AllScored" >> beam.Flatten(), "dropped": dropped,
                "read": read[READ], "live": read[LIVE]}
