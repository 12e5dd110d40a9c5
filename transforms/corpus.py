"""Filter a web image-text corpus (WebDataset shards in img2dataset's layout) with synpref's rewards.

Steps (``pipelines/filter_corpus.py`` wires them):

1. ``ScoreShards``: one DoFn per input shard reads raw tar members (never unpickles), groups them into
   samples by key, checks member names, caption (UTF-8, not empty) and metadata (a JSON object),
   decodes the image with ``decode_image`` (pixel limit from the header), scores batches with the
   reward ensemble, and drops the pixels before yielding: records carry key, caption, metadata,
   scores, the image's sha256 and its location (shard, member, byte offset, size), never pixels.
2. ``DedupKeys`` (a key seen again in a later shard: ``duplicate_key``), then ``DedupExact``: samples
   with equal image sha256 keep the smallest key (``exact_duplicate``);
   optionally ``DedupNear``: a perceptual hash (dHash) within N bits of a smaller key (``near_duplicate``).
3. ``ApplyFilters``: per-reward ``min``/``max`` thresholds and "top fraction by a score" (a global
   quantile from ``ApproximateQuantiles`` as a side input), combined with ``and``/``or``.
4. ``WriteFiltered``: output shard = position of the key in the sorted kept keys / samples_per_shard;
   the writer copies the original bytes by offset (checking the sha256), sorted by key, fixed mtime.
5. ``WriteOutcomes``: per input shard, a Parquet index of every sample (kept or not, with reason) and
   a dead-letter JSONL of the dropped ones; both sorted by key, so bytes do not depend on the runner.

Every input sample ends in exactly one outcome, so ``in == kept + sum(dropped by reason)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import sys
from typing import Optional, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from apache_beam.metrics import Metrics
from PIL import Image

from ..core.progress import progress
from ..schemas.config import RewardConfig
from ..schemas.records import CorpusRecord
from .corpus_sources import SHARD_KEY, CorpusInput
from ..core.fileio import AtomicFile, canonical_json, sha256_of
from ..core.errors import error_line
from .imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, ImageDecodeError, check_member_name, \
    decode_image
from .perceptual_hash import dhash_hex as dhash, hamming  # dhash: 16 hex digits
from .rewards import create_reward
from .scoring import score_ensemble
from .writing import TAR_MTIME

DROPPED = "dropped"
READ = "read"


# preprocess_key()s that start by shrinking the image to ``key[1]`` pixels (the short side for a
# centre crop, the long side for padding to a square), so a smaller decode changes their input little.
_SHRINKING_KEYS = ("clip_center_crop", "clip_pad_square", "clip_expand2square")


def draft_side(rewards) -> tuple[int, str]:
    """(side, why): the short side a JPEG may be decoded down to for every reward (0 if some reward
    reads pixels at full resolution, e.g. sharpness or resolution, with the reason)."""
    sides = []
    for r in rewards:
        key = r.preprocess_key()
        if not (isinstance(key, tuple) and len(key) > 1 and key[0] in _SHRINKING_KEYS and isinstance(key[1], int)):
            return 0, f"reward {r.name} reads pixels at full resolution"
        sides.append(key[1])
    return max(sides), ""


class LoadedRewards:
    def __init__(self, rewards):
        self.rewards = rewards


class ScoreShards(beam.DoFn):
    """(shard index, shard URL) -> CorpusRecord per sample (kept so far), dropped ones tagged ``dropped``.

    Pixels exist only inside ``process``: decoded per batch, scored, released.
    """

    def __init__(self, rewards: Sequence[RewardConfig], max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 16,
                 max_caption_chars: int = 0, torch_threads: int = 1, corpus_input: Optional[CorpusInput] = None,
                 perceptual_hash: bool = True, jpeg_draft: bool = False, total_shards: Optional[int] = None):
        self.configs, self.max_pixels, self.batch_size = list(rewards), max_pixels, batch_size
        self.total_shards = total_shards  # for progress lines with time left
        self.corpus_input = corpus_input or CorpusInput()
        # the dHash resizes the full image (about as costly as decoding it): only when near dedup needs it
        self.perceptual_hash = perceptual_hash
        self.jpeg_draft, self.draft_side = jpeg_draft, 0
        self.max_caption_chars, self.torch_threads = max_caption_chars, torch_threads
        self.model: Optional[LoadedRewards] = None

    def setup(self):
        rewards = [create_reward(c.name, c.params) for c in self.configs]
        for r in rewards:
            r.load()
        if self.torch_threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(self.torch_threads)
        self.model = LoadedRewards(rewards)
        if self.jpeg_draft:
            self.draft_side, why = draft_side(rewards)
            if not self.draft_side:
                logging.getLogger("synpref.filter").warning("input.jpeg_draft: %s; decoding at full size", why)

    def _check(self, rec: CorpusRecord, members: dict, problem):
        """A record with its image decoded, or the record dropped with a reason."""
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
        if self.max_caption_chars and len(caption) > self.max_caption_chars:
            return rec.drop("caption_too_long", "read", f"{len(caption)} > {self.max_caption_chars} chars"), None
        if "json" in members:
            try:
                text = members["json"][0].decode("utf-8")
                meta = json.loads(text)
            except (UnicodeDecodeError, ValueError) as e:
                return rec.drop("invalid_metadata", "read", error_line(e)), None
            if not isinstance(meta, dict):
                return rec.drop("invalid_metadata", "read", f"json is a {type(meta).__name__}, not an object"), None
            rec = dataclasses.replace(rec, metadata=text)
        try:
            image = decode_image(data, self.max_pixels, draft_min_side=self.draft_side)
        except ImageDecodeError as e:
            return rec.drop(e.reason, "decode", e.detail), None
        width, height = Image.open(io.BytesIO(data)).size if self.draft_side else image.size  # the original's
        return dataclasses.replace(rec, width=width, height=height,
                                   dhash=dhash(image) if self.perceptual_hash else ""), image

    def _score(self, batch: list):
        records, images = [r for r, _ in batch], [im for _, im in batch]
        scores = score_ensemble(self.model.rewards, images, [r.caption for r in records])
        del images  # the pixels end here
        failed = [(name, s) for name, s in scores.items() if isinstance(s, str)]
        for i, rec in enumerate(records):
            if failed:
                yield beam.pvalue.TaggedOutput(DROPPED, rec.drop("scoring_error", f"score:{failed[0][0]}",
                                                                 failed[0][1]))
                continue
            rec = dataclasses.replace(rec, scores={name: s[i] for name, s in scores.items()})
            bad = sorted(n for n, s in rec.scores.items() if not math.isfinite(s))
            if bad:
                yield beam.pvalue.TaggedOutput(DROPPED, rec.drop("nan_score", f"score:{bad[0]}",
                                                                 "non-finite score from " + ", ".join(bad)))
            else:
                yield rec

    def process(self, element):
        index, url = element
        n, batch = 0, []
        samples = progress("read", None, "samples")
        for key, members, problem in self.corpus_input.source_for(url).iter_samples(url):
            n += 1
            samples.update()
            rec, image = self._check(CorpusRecord(key=key, shard_index=index, source_shard=url), members, problem)
            members = None
            if image is None:
                Metrics.counter("synpref", f"filter_drop_{rec.reason}").inc()
                yield beam.pvalue.TaggedOutput(DROPPED, rec)
                continue
            batch.append((rec, image))
            if len(batch) >= self.batch_size:
                yield from self._score(batch)
                batch = []
        if batch:
            yield from self._score(batch)
        progress("score", self.total_shards, "shards").update()
        yield beam.pvalue.TaggedOutput(READ, n)


def _keep_smallest_key(element):
    sha, records = element
    records = sorted(records, key=lambda r: (r.key, r.source_shard))
    yield records[0]
    for r in records[1:]:
        yield beam.pvalue.TaggedOutput(DROPPED, r.drop("exact_duplicate", "dedup",
                                                       f"same image bytes (sha256 {sha[:16]}) as kept key "
                                                       f"{records[0].key} in {records[0].source_shard}"))


def _keep_first_of_key(element):
    _, records = element
    records = sorted(records, key=lambda r: (r.shard_index, r.offset))
    yield records[0]
    for r in records[1:]:
        yield beam.pvalue.TaggedOutput(DROPPED, r.drop("duplicate_key", "dedup",
                                                       f"key already read from {records[0].source_shard}"))


class DedupKeys(beam.PTransform):
    """Keys name output members, so they must be unique: the first occurrence (shard order) is kept."""

    def expand(self, records):
        return (records
                | "ByKey" >> beam.Map(lambda r: (r.key, r))
                | "GroupSameKey" >> beam.GroupByKey()
                | "KeepFirst" >> beam.FlatMap(_keep_first_of_key).with_outputs(DROPPED, main="kept"))


class DedupExact(beam.PTransform):
    """Keep one sample per image sha256 (the smallest key); the others are ``exact_duplicate``."""

    def expand(self, records):
        return (records
                | "BySha256" >> beam.Map(lambda r: (r.image_sha256, r))
                | "GroupSame" >> beam.GroupByKey()
                | "KeepSmallestKey" >> beam.FlatMap(_keep_smallest_key).with_outputs(DROPPED, main="kept"))


def _bands(rec: CorpusRecord, n: int):
    """Split the hash into ``n`` bands: two hashes within n - 1 bits share at least one band (pigeonhole)."""
    h = int(rec.dhash, 16)
    bounds = [round(64 * i / n) for i in range(n + 1)]
    for i in range(n):
        yield f"{i}:{(h >> bounds[i]) & ((1 << (bounds[i + 1] - bounds[i])) - 1):x}", (rec.key, rec.dhash)


def _near_pairs(element, max_distance: int):
    _, members = element
    members = sorted(set(members))
    for i, (k1, h1) in enumerate(members):
        for k2, h2 in members[i + 1:]:
            d = hamming(h1, h2)
            if k2 != k1 and d <= max_distance:
                yield k2, (k1, d)  # k2 > k1: the larger key is the one that goes


def _drop_near(element):
    _, grouped = element
    near = min(grouped["near"]) if grouped["near"] else None
    for rec in grouped["records"]:
        if near is None:
            yield rec
        else:
            yield beam.pvalue.TaggedOutput(DROPPED, rec.drop(
                "near_duplicate", "dedup", f"perceptual hash within {near[1]} bits of kept-or-earlier key {near[0]}"))


class DedupNear(beam.PTransform):
    """Drop a sample whose dHash is within ``max_distance`` bits of a sample with a smaller key.

    Candidates are found by LSH banding (max_distance + 1 bands), so no all-pairs comparison; a chain
    A ~ B ~ C drops both B and C even if A and C are far apart (every drop names its nearest smaller key).
    """

    def __init__(self, max_distance: int):
        super().__init__()
        self.max_distance = max_distance

    def expand(self, records):
        d = self.max_distance
        near = (records
                | "Bands" >> beam.FlatMap(_bands, d + 1)
                | "SameBand" >> beam.GroupByKey()
                | "NearPairs" >> beam.FlatMap(_near_pairs, d)
                | "SmallestNearKey" >> beam.CombinePerKey(min))
        keyed = records | "ByKey" >> beam.Map(lambda r: (r.key, r))
        return ({"records": keyed, "near": near}
                | "Join" >> beam.CoGroupByKey()
                | "DropNear" >> beam.FlatMap(_drop_near).with_outputs(DROPPED, main="kept"))


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def judge(rec: CorpusRecord, thresholds, top, cutoff: Optional[float], mode: str):
    """(passes, reason, detail) of one record under the thresholds and the top-fraction cutoff."""
    failures = []
    for t in thresholds:
        reason, detail = t.violation(rec.scores[t.reward])
        failures.append((reason, detail) if reason else None)
    if top is not None:
        s = rec.scores[top.reward]
        if cutoff is None or s < cutoff:
            failures.append(("not_top_fraction", f"{top.reward} {_fmt(s)} < {1 - top.fraction:.4g} quantile "
                                                 f"{_fmt(cutoff) if cutoff is not None else 'n/a'}"))
        else:
            failures.append(None)
    if not failures:
        return True, "", ""
    passes = all(f is None for f in failures) if mode == "and" else any(f is None for f in failures)
    if passes:
        return True, "", ""
    first = next(f for f in failures if f is not None)
    return False, first[0], first[1]


def quantile_cutoff(quantiles: list, fraction: float) -> Optional[float]:
    """The (1 - fraction) quantile from ApproximateQuantiles' evenly spaced list (None if empty)."""
    if not quantiles:
        return None
    i = int(round((1.0 - fraction) * (len(quantiles) - 1)))
    return float(quantiles[min(max(i, 0), len(quantiles) - 1)])


class ApplyFilters(beam.PTransform):
    """CorpusRecord -> kept records (main ``kept``) and dropped ones (``dropped``); plus the cutoff used."""

    def __init__(self, thresholds, top_fraction, mode: str):
        super().__init__()
        self.thresholds, self.top, self.mode = tuple(thresholds), top_fraction, mode

    def expand(self, records):
        thresholds, top, mode = self.thresholds, self.top, self.mode
        if top is not None:
            quantiles = (records
                         | "TopScore" >> beam.Map(lambda r: r.scores[top.reward])
                         | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(top.num_quantiles))
            cutoff = quantiles | "Cutoff" >> beam.Map(quantile_cutoff, top.fraction)
        else:
            cutoff = records.pipeline | "NoCutoff" >> beam.Create([None])

        def apply(rec, cut):
            ok, reason, detail = judge(rec, thresholds, top, cut, mode)
            if ok:
                yield rec
            else:
                yield beam.pvalue.TaggedOutput(DROPPED, rec.drop(reason, "filter", detail))

        out = records | "Judge" >> beam.FlatMap(apply, beam.pvalue.AsSingleton(cutoff, default_value=None)) \
            .with_outputs(DROPPED, main="kept")
        return {"kept": out.kept, "dropped": out[DROPPED], "cutoff": cutoff}


_canonical_json = canonical_json


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:05d}"


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
    sample = {"__key__": key, suffix: image, "txt": rec.caption_bytes, "json": _canonical_json(meta)}
    for ext in sample:
        if ext != "__key__":
            check_member_name(f"{key}.{ext}")
    return sample


class _WriteShard(beam.DoFn):
    def __init__(self, output_dir: str, corpus_input: Optional[CorpusInput] = None):
        self.output_dir = output_dir.rstrip("/")
        self.corpus_input = corpus_input or CorpusInput()

    def process(self, element):
        index, records = element
        records = sorted(records, key=lambda r: r.key)
        name = shard_name("filtered", index)
        tar_path = f"{self.output_dir}/shards/{name}.tar"
        readers = {}  # one open reader per source unit: records in key order mostly read each unit forwards
        try:
            with AtomicFile(tar_path) as f, wds.TarWriter(f, encoder=False, mtime=TAR_MTIME) as tar:
                for rec in records:
                    if rec.source_shard not in readers:
                        readers[rec.source_shard] = self.corpus_input.source_for(rec.source_shard).open_images(
                            rec.source_shard)
                    data = readers[rec.source_shard].read(rec.image_member, rec.offset, rec.size)
                    if hashlib.sha256(data).hexdigest() != rec.image_sha256:
                        raise IOError(f"{rec.source_shard} changed while filtering: {rec.image_member} no longer "
                                      "has the bytes that were scored; rerun")
                    tar.write(output_sample(rec, data))
        finally:
            for reader in readers.values():
                reader.close()
        fs, path = fsspec.core.url_to_fs(tar_path)
        yield {"shard": name, "tar": f"shards/{name}.tar", "samples": len(records), "size": fs.size(path),
               "sha256": sha256_of(tar_path),
               "first_key": records[0].key, "last_key": records[-1].key}


class WriteFiltered(beam.PTransform):
    """Kept CorpusRecords -> ``shards/filtered-NNNNN.tar`` (keys sorted; shard = sorted position / per_shard)."""

    def __init__(self, output_dir: str, samples_per_shard: int, corpus_input: Optional[CorpusInput] = None):
        super().__init__()
        self.output_dir, self.per_shard, self.corpus_input = output_dir, samples_per_shard, corpus_input

    def expand(self, kept):
        per_shard = self.per_shard
        index = (kept
                 | "Keys" >> beam.Map(lambda r: r.key)
                 | "AllKeys" >> beam.combiners.ToList()
                 | "ShardIndex" >> beam.Map(lambda keys: {k: i // per_shard for i, k in enumerate(sorted(keys))}))
        return (kept
                | "AssignShard" >> beam.Map(lambda r, idx: (idx[r.key], r), beam.pvalue.AsSingleton(index))
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(_WriteShard(self.output_dir, self.corpus_input)))


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
