"""Export a finished build to other preference-data formats: ``synpref export --format NAME BUILD OUT``.

Formats live in ``EXPORTERS`` (name -> exporter class); an exporter takes the build folder, the output
folder and its options, and ``run()`` returns a summary dict. Today there is one:

``pickapic``: parquet files in the Pick-a-Pic v2 schema (``PICKAPIC_V2_SCHEMA``, the full column list
of Pick-a-Pic v2, Kirstain et al. 2023, arXiv 2305.01569), which is what Diffusion-DPO trainers read (``caption``, ``jpg_0``, ``jpg_1``,
``label_0``, and ``model_0``/``model_1`` in the official code). Rows come from

* ``pairs="all"``: every pair the build kept (``pairs/pairs-*.tar``: ``win.png``/``lose.png``), one row
  each, so the row count equals the manifest's ``counts.pairs.written``;
* ``pairs="best_worst"``: one row per prompt from the ranked shards, rank 1 (``img0.png``) against
  rank k (the last image); prompts with fewer than two images, or whose best and worst share the
  same aggregate score (a tie), give no row.

How each column is filled (also written to the dataset card):

* ``caption``: the prompt. ``jpg_0``/``jpg_1``: the PNGs re-encoded as baseline JPEG (RGB, ``quality``,
  4:4:4 chroma: no subsampling, which on fine-grained images costs 3x the error; no EXIF, no optimisation
  pass, so the bytes are a pure function of the pixels and the Pillow/libjpeg version).
* Position: the winner goes to slot 1 when the first byte of ``sha256(pair key)`` is odd, else to slot 0
  (pair key = ``<winner id>__<loser id>``). So ``label_0`` is 1.0 for about half the rows, and the same
  pair always lands the same way. ``label_0``/``label_1`` are float64 1.0/0.0; synpref pairs are never
  ties, so 0.5 never occurs and ``has_label`` is always True.
* ``model_0``/``model_1``: the generator id of the build config (e.g. ``tiny-sd-a``).
* ``image_0_uid``/``image_1_uid``: synpref candidate ids; ``best_image_uid``: the winner's candidate id.
* ``image_0_url``/``image_1_url``: null (synpref images have no URL).
* ``are_different``: whether the two images' decoded pixels differ.
* ``ranking_id``: the first 8 bytes of ``sha256(pair key)`` as a big-endian int64 with the sign bit
  cleared (stable, unique in practice). ``user_id``: 0 (no human annotator).
* ``num_example_per_prompt``: rows this export writes for the same prompt (as in Pick-a-Pic).
* ``created_at``: null (kept out on purpose: a wall-clock value would make two exports differ).

Memory is bounded: tars are streamed member by member, rows are buffered for one prompt at a time
(pairs of a prompt are contiguous in a shard) and flushed in row groups of ``ROW_GROUP`` rows. The
output bytes are deterministic for the same build and options (file names, row order = shard order,
no timestamps or paths in the parquet metadata).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ..core.registry import Registry
from ..core.fileio import AtomicFile, check_writable
from ..transforms.imageio import decode_members
from ..transforms.writing import shard_paths
from ..runs.output_folder import LOCK_NAME
from .pickapic import PICKAPIC_V2_SCHEMA

if TYPE_CHECKING:
    from PIL import Image


EXPORT_FORMAT_VERSION = "1"  # bump when the bytes an export writes change for the same build
ROW_GROUP = 64
CARD_MARKER = "<!-- synpref export -->"



def _entries(fs, path: str) -> list[str]:
    """The folder's entry names but the output folder's lock (``synpref.runs.output_folder``), which the
    export command holds while it runs."""
    return [n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
            if n not in (LOCK_NAME, LOCK_NAME + ".takeover")]

class ExportError(ValueError):
    """A bad build folder, output folder or option: the CLI reports it as one line."""


@dataclass
class PairRow:
    """One preference pair, oriented winner/loser, before it is placed in slots 0/1."""
    prompt_id: str
    caption: str
    winner_id: str
    loser_id: str
    winner_model: str
    loser_model: str
    winner_image: "Image.Image"
    loser_image: "Image.Image"

    @property
    def key(self) -> str:
        return f"{self.winner_id}__{self.loser_id}"


def read_manifest(build_dir: str) -> dict:
    fs, path = fsspec.core.url_to_fs(build_dir.rstrip("/") + "/manifest.json")
    if not fs.exists(path):
        raise ExportError(f"no manifest.json in {build_dir}: not a finished synpref build "
                          "(rerun the build command to finish it)")
    try:
        manifest = json.loads(fs.cat(path))
    except ValueError as e:
        raise ExportError(f"{build_dir}/manifest.json does not parse: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("job", "build") != "build" or "shards" not in manifest:
        kind = manifest.get("job", "unknown") if isinstance(manifest, dict) else "unknown"
        raise ExportError(f"{build_dir} is a synpref {kind} output, not a build: export reads a build's "
                          "ranked and pairs shards")
    return manifest


def iter_tar_samples(uri: str) -> Iterator[dict]:
    """Raw samples of a WebDataset tar, streamed; never unpickles. Members of a sample are consecutive."""
    with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        sample: dict = {}
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")  # webdataset's split: key up to the first dot
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            sample.setdefault("__key__", key)
            sample[ext] = tar.extractfile(member).read()
        if sample:
            yield sample


def _jpeg(img: "Image.Image", quality: int) -> tuple[bytes, bytes]:
    """(JPEG bytes, raw RGB pixels) of a decoded image."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False, progressive=False)
    return buf.getvalue(), img.tobytes()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def winner_slot(key: str) -> int:
    """0 or 1: where the winner of pair ``key`` goes (odd first byte of sha256(key) -> slot 1)."""
    return _digest(key)[0] & 1


def ranking_id(key: str) -> int:
    return int.from_bytes(_digest(key)[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


EXPORTERS = Registry("export format")  # synpref export --format NAME -> exporter class


@EXPORTERS.register("pickapic")
class PickAPicExporter:
    """Build -> Pick-a-Pic v2 parquet files ``data/train-NNNNN.parquet`` plus ``README.md``."""

    schema = PICKAPIC_V2_SCHEMA

    def __init__(self, build_dir: str, out_dir: str, pairs: str = "all", jpeg_quality: int = 95,
                 rows_per_file: int = 1000):
        if pairs not in ("all", "best_worst"):
            raise ExportError(f"--pairs must be all or best_worst, not {pairs!r}")
        if not 1 <= jpeg_quality <= 100:
            raise ExportError(f"--jpeg-quality must be in 1..100, not {jpeg_quality}")
        if rows_per_file < 1:
            raise ExportError(f"--rows-per-file must be at least 1, not {rows_per_file}")
        self.build_dir, self.out_dir = build_dir.rstrip("/"), out_dir.rstrip("/")
        self.pairs, self.quality, self.rows_per_file = pairs, jpeg_quality, rows_per_file
        self.manifest = read_manifest(self.build_dir)
        self.skipped: dict[str, int] = {}

    # ---- input -------------------------------------------------------------------------------------------
    def _shard_uris(self, kind: str) -> list[str]:
        uris = []
        for shard in sorted(self.manifest.get("shards", []), key=lambda s: s["shard"]):
            uri = shard_paths(self.build_dir, int(shard["shard"]))[kind]  # relative: the build may have moved
            fs, path = fsspec.core.url_to_fs(uri)
            if not fs.exists(path):
                raise ExportError(f"{uri} is listed in the manifest but missing: the build folder is incomplete")
            uris.append(uri)
        return uris

    def _skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def iter_pairs(self) -> Iterator[PairRow]:
        if self.pairs == "all":
            for uri in self._shard_uris("pairs_tar"):
                for raw in iter_tar_samples(uri):
                    s = decode_members(raw)  # checks member names, parses json, decodes images safely
                    meta = s["json"]
                    w, l = meta["winner"], meta["loser"]
                    yield PairRow(meta["prompt_id"], meta["prompt"], w["candidate_id"], l["candidate_id"],
                                  w["lineage"]["generator_id"], l["lineage"]["generator_id"],
                                  s[w.get("image", "win.png")], s[l.get("image", "lose.png")])
        else:
            for uri in self._shard_uris("ranked_tar"):
                for raw in iter_tar_samples(uri):
                    s = decode_members(raw)
                    meta = s["json"]
                    cands = sorted(meta["candidates"], key=lambda c: c["rank"])
                    if len(cands) < 2:
                        self._skip("fewer_than_two_images")
                        continue
                    best, worst = cands[0], cands[-1]
                    if best["phi"] == worst["phi"]:
                        self._skip("tied_best_worst")
                        continue
                    yield PairRow(meta["prompt_id"], meta["prompt"], best["candidate_id"], worst["candidate_id"],
                                  best["lineage"]["generator_id"], worst["lineage"]["generator_id"],
                                  s[best["image"]], s[worst["image"]])

    def iter_prompt_groups(self) -> Iterator[list[PairRow]]:
        """Consecutive pairs of the same prompt (a prompt's pairs are contiguous within one shard)."""
        group: list[PairRow] = []
        for row in self.iter_pairs():
            if group and row.prompt_id != group[0].prompt_id:
                yield group
                group = []
            group.append(row)
        if group:
            yield group

    # ---- rows --------------------------------------------------------------------------------------------
    def to_record(self, p: PairRow, n_for_prompt: int) -> dict:
        win_jpg, win_px = _jpeg(p.winner_image, self.quality)
        lose_jpg, lose_px = _jpeg(p.loser_image, self.quality)
        slot = winner_slot(p.key)
        ids, models, jpgs = [p.winner_id, p.loser_id], [p.winner_model, p.loser_model], [win_jpg, lose_jpg]
        labels = [1.0, 0.0]
        if slot == 1:
            ids, models, jpgs, labels = ids[::-1], models[::-1], jpgs[::-1], labels[::-1]
        return {
            "caption": p.caption, "jpg_0": jpgs[0], "jpg_1": jpgs[1], "label_0": labels[0], "label_1": labels[1],
            "model_0": models[0], "model_1": models[1], "image_0_uid": ids[0], "image_1_uid": ids[1],
            "image_0_url": None, "image_1_url": None, "best_image_uid": p.winner_id,
            "are_different": win_px != lose_px, "has_label": True, "ranking_id": ranking_id(p.key),
            "user_id": 0, "num_example_per_prompt": n_for_prompt, "created_at": None,
        }

    # ---- output ------------------------------------------------------------------------------------------
    @staticmethod
    def _earlier_export(fs, path: str) -> bool:
        """A finished export (its card has the marker) or an interrupted one (only data/train-*.parquet[.tmp])."""
        card = path + "/README.md"
        if fs.exists(card):
            return CARD_MARKER in fs.cat(card).decode("utf-8", "replace")
        names = _entries(fs, path)
        if names != ["data"] or not fs.isdir(path + "/data"):
            return False
        return all(n.rstrip("/").rsplit("/", 1)[-1].startswith("train-") for n in fs.ls(path + "/data", detail=False))

    def _prepare_out_dir(self) -> None:
        fs, path = fsspec.core.url_to_fs(self.out_dir)
        build_fs, build_path = fsspec.core.url_to_fs(self.build_dir)
        if fs.protocol == build_fs.protocol and os.path.normpath(path) == os.path.normpath(build_path):
            raise ExportError("OUT_DIR must not be the build folder")
        try:
            if fs.exists(path):
                if not fs.isdir(path):
                    raise ExportError(f"cannot write to {self.out_dir}: it is a file, not a folder")
                if _entries(fs, path):
                    if not self._earlier_export(fs, path):
                        raise ExportError(f"{self.out_dir} is not empty and not an earlier synpref export: "
                                          "pick an empty or new folder")
                    for old in fs.glob(path + "/data/train-*.parquet*"):  # an earlier export: replace it whole
                        fs.rm(old)
            fs.makedirs(path + "/data", exist_ok=True)
            check_writable(self.out_dir + "/data", "export")
        except ExportError:
            raise
        except ValueError as e:
            raise ExportError(f"cannot write to {self.out_dir}: {e}") from None
        except OSError as e:
            raise ExportError(f"cannot write to {self.out_dir}: {e.strerror or e}") from None

    def _file_uri(self, index: int) -> str:
        return f"{self.out_dir}/data/train-{index:05d}.parquet"

    def _metadata(self) -> dict[bytes, bytes]:
        info = {"exporter": self.name, "export_format_version": EXPORT_FORMAT_VERSION, "pairs": self.pairs,
                "jpeg_quality": self.quality, "build_run_fingerprint": self.manifest.get("run_fingerprint", ""),
                "synpref_version": self.manifest.get("synpref_version", "")}
        return {b"synpref_export": json.dumps(info, sort_keys=True).encode()}

    def run(self) -> dict:
        self._prepare_out_dir()
        schema = self.schema.with_metadata(self._metadata())
        files: list[str] = []
        rows_total, rows_in_file, label0_ones, buffer = 0, 0, 0, []
        writer: pq.ParquetWriter | None = None
        atomic: AtomicFile | None = None

        def flush():
            if buffer:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema), row_group_size=ROW_GROUP)
                buffer.clear()

        def close_file():
            nonlocal writer, atomic
            flush()
            writer.close()
            atomic.__exit__(None, None, None)
            writer = atomic = None

        try:
            for group in self.iter_prompt_groups():
                for p in group:
                    if writer is None:
                        uri = self._file_uri(len(files))
                        atomic = AtomicFile(uri)
                        writer = pq.ParquetWriter(atomic.__enter__(), schema, compression="snappy")
                        files.append(uri)
                        rows_in_file = 0
                    record = self.to_record(p, len(group))
                    label0_ones += record["label_0"] == 1.0
                    buffer.append(record)
                    rows_total += 1
                    rows_in_file += 1
                    if len(buffer) >= ROW_GROUP:
                        flush()
                    if rows_in_file >= self.rows_per_file:
                        close_file()
        except BaseException as e:
            if writer is not None:
                try:
                    writer.close()
                finally:
                    atomic.__exit__(type(e), e, None)
            raise
        if writer is not None:
            close_file()
        if not files:  # an empty export is still a loadable dataset with the right columns
            uri = self._file_uri(0)
            with AtomicFile(uri) as f:
                pq.write_table(schema.empty_table(), f, compression="snappy")
            files.append(uri)
        expected = self.manifest.get("counts", {}).get("pairs", {}).get("written") if self.pairs == "all" else None
        summary = {"format": self.name, "pairs": self.pairs, "rows": rows_total, "files": files,
                   "label_0_is_winner": int(label0_ones), "skipped": dict(sorted(self.skipped.items())),
                   "manifest_pairs_written": expected, "out_dir": self.out_dir}
        with AtomicFile(self.out_dir + "/README.md") as f:
            f.write(self.dataset_card(summary).encode("utf-8"))
        return summary

    def dataset_card(self, summary: dict) -> str:
        m = self.manifest
        features = "\n".join(f"| `{f.name}` | {f.type} |" for f in self.schema)
        source = ("every pair the build kept (`pairs/` shards)" if self.pairs == "all" else
                  "per prompt, rank 1 against rank k of the ranked shards (`ranked/`)")
        skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"
        return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
tags:
- synpref
- preference
- text-to-image
---
{CARD_MARKER}
# Synthetic preference pairs in the Pick-a-Pic v2 format

Exported by `synpref export --format pickapic --pairs {self.pairs} --jpeg-quality {self.quality}` from a
synpref build (run fingerprint `{m.get("run_fingerprint", "")}`, synpref {m.get("synpref_version", "")},
aggregator `{m.get("aggregator", "")}`, rewards {", ".join(r if isinstance(r, str) else r.get("name", str(r))
                                                     for r in m.get("rewards", []))}).

Rows: {summary["rows"]} ({source}); label_0 = 1 in {summary["label_0_is_winner"]} of them; skipped: {skipped}.

```python
import datasets
ds = datasets.load_dataset("<this folder>", split="train")
```

## Columns (Pick-a-Pic v2 schema)

| column | type |
|---|---|
{features}

## How synpref fills them

- `caption`: the prompt. `jpg_0`, `jpg_1`: the generated PNGs re-encoded as JPEG, quality {self.quality},
  4:4:4 chroma (no subsampling).
- The winner is in slot 1 when the first byte of sha256(`<winner id>__<loser id>`) is odd, else in
  slot 0, so `label_0` is 1 for about half the rows and a pair always lands the same way.
- `label_0`, `label_1`: 1.0 / 0.0 (float64). synpref pairs are never ties: no 0.5, `has_label` is always true.
- `model_0`, `model_1`: generator ids of the build config.
- `image_0_uid`, `image_1_uid`: synpref candidate ids. `best_image_uid`: the winner's candidate id.
- `image_0_url`, `image_1_url`: null (no URLs). `created_at`: null (keeps exports byte-identical).
- `are_different`: whether the decoded pixels differ. `has_label`: true.
- `ranking_id`: first 8 bytes of sha256(pair key) as int64, sign bit cleared. `user_id`: 0 (no human annotator).
- `num_example_per_prompt`: rows in this export with the same prompt.

Labels are synthetic: they come from reward models aggregated by synpref, not from people.
"""




def export(fmt: str, build_dir: str, out_dir: str, **options) -> dict:
    """Run the exporter registered as ``fmt``; raises ExportError for a bad folder, format or option."""
    if fmt not in EXPORTERS:
        raise ExportError(f"unknown format {fmt!r}: choose from {', '.join(EXPORTERS.names())}")
    return EXPORTERS[fmt](build_dir, out_dir, **options).run()
