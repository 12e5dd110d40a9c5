"""Write ranked and pairwise WebDataset shards, each with a Parquet index and a stats file.

Shard assignment: a prompt's shard is its position in the sorted prompt ids divided by
``samples_per_shard``, as it always was, but computed without any list of all ids. Prompt ids
are sha256 hex prefixes, so the first four characters split them into at most 65536 ordered
buckets of about n / 65536 ids each: a count per bucket (at most 65536 numbers) gives each
bucket its first position, and each bucket, sorted on its own, gives its prompts their positions.
No worker holds more than one bucket or one shard (groups carry ids, scores and URIs, not
pixels), and the same inputs give the same shards on every runner (``AssignShards``; any ids
work, but other than hex ids may crowd few buckets). Each file is written under a temporary
name and renamed; the stats file, written last, records a fingerprint of everything that went
into the shard (labels, scores, lineage, image hashes) and the sha256 of each file's bytes. A rerun
keeps a shard only when both still match (re-reading the files).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Iterable

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from apache_beam.metrics import Metrics

from ..core.progress import progress
from ..schemas.records import PAIR_INDEX_SCHEMA, RANKED_INDEX_SCHEMA, RankedGroup
from ..core.fileio import AtomicFile, canonical_json, dumps_strict, read_bytes, sha256_of
from .imageio import check_member_name

TAR_MTIME = 0.0  # fixed member mtime: byte-identical shards across runs
# Bump when the bytes a shard holds change for the same inputs (layout, encoding), so old shards are rewritten.
SHARD_FORMAT = "2"
SHARD_FILES = ("ranked_tar", "ranked_index", "pairs_tar", "pairs_index")


def shard_paths(output_dir: str, shard: int) -> dict[str, str]:
    name = f"{shard:05d}"
    root = output_dir.rstrip("/")
    return {
        "name": name,
        "ranked_tar": f"{root}/ranked/ranked-{name}.tar",
        "ranked_index": f"{root}/ranked/ranked-{name}.parquet",
        "pairs_tar": f"{root}/pairs/pairs-{name}.tar",
        "pairs_index": f"{root}/pairs/pairs-{name}.parquet",
        "stats": f"{root}/_stats/shard-{name}.json",
    }


_canonical_json = canonical_json


_MEMBER_EXT = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}


def image_ext(c) -> str:
    """The member extension of a candidate's image: that of its staged file (``output.image_format``
    decides it at generation; the shard copies the staged bytes, so the name follows them)."""
    return _MEMBER_EXT.get(c.image_uri.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower(), "png")


def ranked_sample(group: RankedGroup, images: dict[str, bytes], reward_info: dict | None = None) -> dict[str, bytes]:
    """One sample per prompt: ``img{r}.<ext>`` in rank order (img0 = best) plus the labels as ``json``."""
    p = group.prompt
    names = [f"img{r}.{image_ext(c)}" for r, c in enumerate(group.candidates)]
    meta = {
        "prompt_id": p.prompt_id, "prompt": p.prompt, "category": p.category,
        "aggregator": group.aggregator, "rewards": list(group.rewards), "reward_info": reward_info or {},
        "candidates": [c.to_json(name) for name, c in zip(names, group.candidates)],
    }
    sample = {"__key__": p.prompt_id, "json": canonical_json(meta)}
    for name, c in zip(names, group.candidates):
        sample[name] = images[c.candidate_id]
    return sample


def shard_fingerprint(groups: list[RankedGroup], reward_info: dict | None = None) -> str:
    """sha256 over every sample's JSON and image hash, in write order: equal fingerprint, equal shard bytes."""
    h = hashlib.sha256(f"synpref-shard-{SHARD_FORMAT}\n".encode())
    for g in groups:
        h.update(ranked_sample(g, {c.candidate_id: c.image_sha256.encode() for c in g.candidates},
                               reward_info)["json"])
        for c in g.candidates:
            h.update(c.image_sha256.encode())
        for pair in g.pairs:
            h.update(pair.key.encode() + repr((pair.phi_winner, pair.phi_loser, pair.agreement)).encode())
    return h.hexdigest()


def _changed_files(stats: dict, paths: dict) -> list[str]:
    """The shard's files whose bytes no longer hash to the sha256 its stats recorded (missing ones too).

    Sizes are not enough: a tar is padded to 10 KiB, so an edit in place keeps its size."""
    recorded = stats.get("sha256") or {}
    changed = []
    for key in SHARD_FILES:
        try:
            same = key in recorded and sha256_of(paths[key]) == recorded[key]
        except FileNotFoundError:
            same = False
        if not same:
            changed.append(paths[key])
    return changed


def _checked(sample: dict[str, bytes]) -> dict[str, bytes]:
    """Refuse member names that could escape a folder when someone untars the shard."""
    for ext in sample:
        if ext != "__key__":
            check_member_name(f"{sample['__key__']}.{ext}")
    return sample


def _read_staged(c) -> bytes:
    data = read_bytes(c.image_uri)
    if hashlib.sha256(data).hexdigest() != c.image_sha256:
        raise IOError(f"staged image {c.image_uri} changed since it was scored (sha256 mismatch): rerun the build")
    return data


def pair_samples(group: RankedGroup, images: dict[str, bytes],
                 reward_info: dict | None = None) -> Iterable[dict[str, bytes]]:
    """One sample per kept pair: ``win.<ext>``, ``lose.<ext>`` and a ``json`` with both candidates' labels."""
    by_id = {c.candidate_id: c for c in group.candidates}
    for pair in group.pairs:
        w, l = by_id[pair.winner_id], by_id[pair.loser_id]
        win, lose = f"win.{image_ext(w)}", f"lose.{image_ext(l)}"
        meta = {
            "prompt_id": group.prompt.prompt_id, "prompt": group.prompt.prompt, "category": group.prompt.category,
            "agreement": pair.agreement, "rewards": list(group.rewards), "aggregator": group.aggregator,
            "reward_info": reward_info or {},
            "winner": w.to_json(win), "loser": l.to_json(lose),
        }
        yield {"__key__": pair.key, "json": canonical_json(meta), win: images[w.candidate_id],
               lose: images[l.candidate_id]}


class _WriteShard(beam.DoFn):
    def __init__(self, output_dir: str, total_groups_hint: int | None = None, reward_info: dict | None = None):
        self.output_dir, self.total, self.reward_info = output_dir, total_groups_hint, reward_info or {}

    def process(self, element):
        shard, groups = element
        groups: list[RankedGroup] = sorted(groups, key=lambda g: g.prompt.prompt_id)
        paths = shard_paths(self.output_dir, shard)
        fingerprint = shard_fingerprint(groups, self.reward_info)
        fs, stats_path = fsspec.core.url_to_fs(paths["stats"])
        if fs.exists(stats_path):
            try:
                stats = json.loads(fs.cat(stats_path))
            except ValueError:
                stats = {}
            changed = _changed_files(stats, paths) if stats.get("fingerprint") == fingerprint else None
            if changed == []:
                Metrics.counter("synpref", "shards_skipped").inc()
                yield {**stats, **{k: v for k, v in paths.items() if k not in ("name", "stats")}}  # folder may have moved
                return
            if changed:
                logging.getLogger("synpref.build").warning("%s changed on disk since it was written: rewriting "
                                                           "shard %s", changed[0], paths["name"])
                Metrics.counter("synpref", "shards_rewritten_changed").inc()
            fs.rm(stats_path)  # from here until the new stats file lands, the shard counts as unfinished
        ranked_rows, pair_rows, n_images = [], [], 0
        # Tar writers close before their files, also on an error (else the tar stream's finaliser writes to
        # a closed file later and buries the real error).
        with AtomicFile(paths["ranked_tar"]) as rf, AtomicFile(paths["pairs_tar"]) as pf, \
                wds.TarWriter(rf, encoder=False, mtime=TAR_MTIME) as ranked_tar, \
                wds.TarWriter(pf, encoder=False, mtime=TAR_MTIME) as pairs_tar:
            start = time.perf_counter()
            for g in groups:
                images = {c.candidate_id: _read_staged(c) for c in g.candidates}
                ranked_tar.write(_checked(ranked_sample(g, images, self.reward_info)))
                n_images += len(images)
                ranked_rows.append({
                    "key": g.prompt.prompt_id, "shard": paths["name"], "prompt_id": g.prompt.prompt_id,
                    "prompt": g.prompt.prompt, "category": g.prompt.category,
                    "num_candidates": len(g.candidates),
                    "candidate_ids": [c.candidate_id for c in g.candidates],
                    "generator_ids": [c.lineage.generator_id for c in g.candidates],
                    "seeds": [c.lineage.seed for c in g.candidates],
                    "phi": [c.phi for c in g.candidates],
                    "scores_json": dumps_strict([c.scores for c in g.candidates], sort_keys=True),
                })
                for sample, pair in zip(pair_samples(g, images, self.reward_info), g.pairs):
                    pairs_tar.write(_checked(sample))
                    pair_rows.append({
                        "key": pair.key, "shard": paths["name"], "prompt_id": pair.prompt_id,
                        "prompt": g.prompt.prompt, "winner_id": pair.winner_id, "loser_id": pair.loser_id,
                        "phi_winner": pair.phi_winner, "phi_loser": pair.phi_loser, "agreement": pair.agreement,
                    })
                progress("write", self.total, "groups").update()
            Metrics.counter("synpref", "write_ms").inc(int(1000 * (time.perf_counter() - start)))
        for key, rows, schema in (("ranked_index", ranked_rows, RANKED_INDEX_SCHEMA),
                                  ("pairs_index", pair_rows, PAIR_INDEX_SCHEMA)):
            with AtomicFile(paths[key]) as f:
                pq.write_table(pa.Table.from_pylist(rows, schema=schema), f)
        stats = {"shard": paths["name"], "groups": len(groups), "images": n_images, "pairs": len(pair_rows),
                 "fingerprint": fingerprint,
                 "sizes": {k: fs.size(fsspec.core.url_to_fs(paths[k])[1]) for k in SHARD_FILES},
                 "sha256": {k: sha256_of(paths[k]) for k in SHARD_FILES},
                 **{k: v for k, v in paths.items() if k not in ("name", "stats")}}
        with AtomicFile(paths["stats"]) as f:  # written last: its presence marks the shard complete
            f.write(canonical_json(stats))
        yield stats


def order_bucket(prompt_id: str) -> int:
    """An order-preserving bucket: the id's first 4 UTF-8 bytes as a number (a < b implies bucket(a) <=
    bucket(b), since UTF-8 byte order is code point order); 65536 buckets for hex ids."""
    return int.from_bytes(prompt_id.encode("utf-8")[:4].ljust(4, b"\0"), "big")


def bucket_offsets(counts: list[tuple[int, int]]) -> dict[int, int]:
    """{bucket: number of prompts in smaller buckets} from (bucket, count) pairs."""
    offsets, total = {}, 0
    for bucket, n in sorted(counts):
        offsets[bucket], total = total, total + n
    return offsets


def _assign(element, offsets: dict[int, int], per_shard: int, key):
    bucket, items = element
    for i, x in enumerate(sorted(items, key=key)):
        yield (offsets[bucket] + i) // per_shard, x


class AssignShards(beam.PTransform):
    """x -> (position of key(x) among all keys, sorted / per_shard, x), with no list of all keys:
    order-preserving buckets (``order_bucket``), a count per bucket, each bucket sorted alone."""

    def __init__(self, per_shard: int, key):
        super().__init__()
        self.per_shard, self.key = per_shard, key

    def expand(self, items):
        key = self.key
        by_bucket = items | "ByBucket" >> beam.Map(lambda x: (order_bucket(key(x)), x))
        offsets = (by_bucket
                   | "Ones" >> beam.Map(lambda kv: (kv[0], 1))
                   | "CountPerBucket" >> beam.CombinePerKey(sum)
                   | "BucketCounts" >> beam.combiners.ToList()  # <= 65536 (bucket, count) pairs for hex ids
                   | "Offsets" >> beam.Map(bucket_offsets))
        return (by_bucket
                | "GroupByBucket" >> beam.GroupByKey()
                | "Positions" >> beam.FlatMap(_assign, beam.pvalue.AsSingleton(offsets), self.per_shard, key))


def _prompt_id(group: RankedGroup) -> str:
    return group.prompt.prompt_id


class WriteShards(beam.PTransform):
    """RankedGroup -> shard stats dicts. The shuffle carries groups (ids, scores, URIs), not pixels."""

    def __init__(self, output_dir: str, samples_per_shard: int, expected_groups: int | None = None,
                 reward_info: dict | None = None):
        super().__init__()
        self.output_dir, self.per_shard, self.expected = output_dir, samples_per_shard, expected_groups
        self.reward_info = reward_info or {}

    def expand(self, groups):
        return (groups
                | "AssignShard" >> AssignShards(self.per_shard, _prompt_id)
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteShard" >> beam.ParDo(_WriteShard(self.output_dir, self.expected, self.reward_info)))
