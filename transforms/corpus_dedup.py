"""Deduplicate corpus records without pixels: repeated keys, identical image bytes, near-identical images.

Each is a shuffle keyed by something bounded (a key, a sha256, an LSH band of a perceptual hash), so no
worker holds more than one group; every drop names the sample that was kept.
"""
from __future__ import annotations

import apache_beam as beam

from ..schemas.records import CorpusRecord
from .corpus_scoring import DROPPED
from .perceptual_hash import hamming


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
