"""``synpref filter``: a corpus in img2dataset's layout with planted bad samples, filtered with weight-free rewards.

The corpus: the five photographs scikit-image ships (as JPEG), a heavily blurred copy of one, generated
images, and planted bad samples (truncated JPEG, HTML saved as .jpg, empty / missing / non-UTF-8
captions, an exact duplicate in another shard, a 20000x20000 PNG bomb). Checked: the ledger balances,
each planted sample is dropped with its reason, kept samples keep key, caption bytes, metadata and image
bytes, a BRISQUE threshold keeps the clean photographs and drops the blurred copy, the top fraction by a
score follows Beam's global quantile, and two runs write the same bytes.
"""
import io
import json
import pathlib
import struct
import tarfile
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image, ImageFilter

from synpref.cli import main
from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict

HTML = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side zeros (as tests/test_safe_reading.py): ~50 kB, 400 MP decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def generated(seed: int) -> bytes:
    """A smooth colourful pattern plus mild noise (photograph-like statistics), 160x200."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:160, 0:200] / 40.0
    base = np.stack([np.sin(x * (1 + seed) + y), np.cos(y * 1.3 + seed), np.sin(x * y / 3 + seed)], -1)
    arr = np.clip(127 + 100 * base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)
    return jpeg(Image.fromarray(arr))


def add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sample(key: str, image: bytes | None, caption: bytes | None, ext: str = "jpg") -> list[tuple[str, bytes]]:
    """img2dataset's members: <key>.jpg, <key>.txt, <key>.json (with its usual fields)."""
    meta = {"key": key, "url": f"https://example.com/{key}.{ext}", "status": "success",
            "caption": caption.decode("utf-8", "replace") if caption is not None else None, "exif": "{}"}
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    photos = {n: jpeg(Image.fromarray(getattr(skimage.data, n)())) for n in PHOTOS}
    blurred = jpeg(Image.open(io.BytesIO(photos["astronaut"])).filter(ImageFilter.GaussianBlur(4)))
    good = {f"{i:09d}": (photos[n], f"a photograph: {n}".encode()) for i, n in enumerate(PHOTOS)}
    for i in range(3):
        good[f"{20 + i:09d}"] = (generated(i), f"a generated pattern {i}".encode())
    # a near duplicate: the astronaut smaller and re-encoded (other bytes, same look); kept unless near dedup is on
    near = jpeg(Image.open(io.BytesIO(photos["astronaut"])).resize((460, 460)), quality=70)
    good["000000015"] = (near, b"the astronaut, smaller")
    planted = {  # key -> (image, caption, ext, expected reason)
        "000000005": (blurred, b"a blurred astronaut", "jpg", "below_threshold"),
        "000000006": (photos["coffee"][: len(photos["coffee"]) // 2], b"truncated coffee", "jpg", "corrupt_image"),
        "000000007": (HTML, b"a page that is not an image", "jpg", "not_an_image"),
        "000000010": (generated(7), b"   ", "jpg", "empty_caption"),
        "000000011": (photos["astronaut"], b"the same astronaut again", "jpg", "exact_duplicate"),
        "000000012": (png_bomb(), b"a decompression bomb", "png", "too_many_pixels"),
        "000000013": (generated(8), "caf\u00e9".encode("latin-1"), "jpg", "non_utf8_caption"),
        "000000014": (generated(9), None, "jpg", "missing_caption"),
    }
    shard0 = [k for k in sorted({**good, **planted}) if k < "000000010"]
    with tarfile.open(root / "00000.tar", "w") as t0, tarfile.open(root / "00001.tar", "w") as t1:
        for key in sorted({**good, **planted}):
            tar = t0 if key in shard0 else t1
            if key in good:
                image, caption = good[key]
                members = sample(key, image, caption)
            else:
                image, caption, ext, _ = planted[key]
                members = sample(key, image, caption, ext)
            for name, data in members:
                add(tar, name, data)
    return {"root": root, "good": good, "near": "000000015", "planted": {k: v[3] for k, v in planted.items()},
            "photos": [f"{i:09d}" for i in range(len(PHOTOS))], "planted_full": planted}


def job(source, out, **filter_cfg) -> dict:
    return {"input": {"source": [str(source)], "batch_size": 4},
            "rewards": [{"name": "brisque"}, {"name": "colourfulness"}, {"name": "resolution"}],
            "filter": filter_cfg, "output": {"output_dir": str(out), "samples_per_shard": 3}}


def read_tar(path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def all_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "run_summary.json"}


@pytest.fixture(scope="module")
def threshold_runs(corpus, tmp_path_factory):
    import yaml

    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"filter_{name}")
        cfg_path = out.parent / f"filter_{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(job("unused", out, thresholds=[{"reward": "brisque", "min": -40}])))
        rc = main(["filter", "--config", str(cfg_path), "--set", f"input.source={corpus['root']}",
                   "--set", f"output.output_dir={out}"])
        assert rc == 0
        runs.append(out)
    return runs


def test_ledger_balances_and_every_planted_sample_is_dropped_with_its_reason(corpus, threshold_runs):
    out = threshold_runs[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["counts"]) == ["samples"]  # the filter's one ledger level, in the build's shape
    c = manifest["counts"]["samples"]
    n_in = len(corpus["good"]) + len(corpus["planted"])
    assert c["in"] == n_in and c["balanced"] and c["written"] + c["dropped_total"] == n_in
    index = pq.read_table(sorted((out / "index").glob("*.parquet"))).to_pylist()
    assert sorted(r["key"] for r in index) == sorted({**corpus["good"], **corpus["planted"]})
    by_key = {r["key"]: r for r in index}
    for key, reason in corpus["planted"].items():
        assert not by_key[key]["kept"] and by_key[key]["reason"] == reason, (key, by_key[key])
    assert "000000000" in by_key["000000011"]["detail"]  # the duplicate names the key that was kept
    drops = [json.loads(line) for p in sorted((out / "dead_letter").glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    assert {d["record_id"]: d["reason"] for d in drops if d["record_id"] in corpus["planted"]} == corpus["planted"]
    assert len(drops) == c["dropped_total"]
    assert all(sorted(d) == ["detail", "level", "reason", "record_id", "stage"] and d["level"] == "sample"
               for d in drops)  # the build's dead-letter schema
    reasons = {}
    for d in drops:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    assert reasons == c["dropped"]


def test_brisque_threshold_keeps_the_clean_photos_and_kept_samples_keep_everything(corpus, threshold_runs):
    out = threshold_runs[0]
    kept = {}
    for p in sorted((out / "shards").glob("*.tar")):
        kept.update(read_tar(p))
    assert set(corpus["photos"]) <= set(kept)  # every clean photograph passes brisque >= -40
    assert "000000005" not in kept  # ... and the heavily blurred copy does not
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(kept) == manifest["counts"]["samples"]["written"] == sum(s["samples"] for s in manifest["shards"])
    for key, members in kept.items():
        image, caption = corpus["good"][key]
        assert members["jpg"] == image and members["txt"] == caption
        meta = json.loads(members["json"])
        assert meta["key"] == key and meta["url"] == f"https://example.com/{key}.jpg" and meta["status"] == "success"
        assert set(meta["synpref_scores"]) == {"brisque", "colourfulness", "resolution"}
        assert meta["synpref_scores"]["brisque"] >= -40


def test_two_runs_write_the_same_bytes(threshold_runs):
    a, b = (all_files(r) for r in threshold_runs)
    assert sorted(a) == sorted(b) and any(k.startswith("shards/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []


def test_top_fraction_uses_the_global_quantile(corpus, tmp_path):
    cfg = filter_config_from_dict(job(corpus["root"], tmp_path / "top", dedup="exact",
                                      top_fraction={"reward": "colourfulness", "fraction": 0.5}))
    result = filter_corpus(cfg)
    c = result["manifest"]["counts"]["samples"]
    assert c["balanced"] and result["summary"]["problems"] == []
    index = pq.read_table(sorted((tmp_path / "top" / "index").glob("*.parquet"))).to_pylist()
    judged = [r for r in index if r["kept"] or r["reason"] == "not_top_fraction"]
    kept = [r["score_colourfulness"] for r in judged if r["kept"]]
    dropped = [r["score_colourfulness"] for r in judged if not r["kept"]]
    assert abs(len(kept) - len(judged) / 2) <= 1 and min(kept) > max(dropped)
    assert result["manifest"]["top_fraction_cutoff"] == pytest.approx(min(kept))


def test_or_mode_keeps_a_sample_that_passes_any_criterion(corpus, tmp_path):
    cfg = filter_config_from_dict(job(corpus["root"], tmp_path / "or", mode="or", thresholds=[
        {"reward": "brisque", "min": 1000}, {"reward": "resolution", "min": 0.1}]))
    result = filter_corpus(cfg)
    index = pq.read_table(sorted((tmp_path / "or" / "index").glob("*.parquet"))).to_pylist()
    kept = {r["key"] for r in index if r["kept"]}
    assert kept == {r["key"] for r in index if r["reason"] in ("", "below_threshold") and r["width"] * r["height"]
                    >= 100_000}
    assert set(corpus["photos"]) <= kept and result["manifest"]["counts"]["samples"]["balanced"]


def test_near_duplicates_by_perceptual_hash(corpus, tmp_path):
    cfg = filter_config_from_dict(job(corpus["root"], tmp_path / "near", near_duplicate_distance=4))
    result = filter_corpus(cfg)
    assert result["manifest"]["counts"]["samples"]["balanced"]
    index = pq.read_table(sorted((tmp_path / "near" / "index").glob("*.parquet"))).to_pylist()
    by_key = {r["key"]: r for r in index}
    for key in (corpus["near"], "000000005"):  # the smaller copy and the blurred copy of the astronaut
        assert by_key[key]["reason"] == "near_duplicate" and "000000000" in by_key[key]["detail"]
    assert by_key["000000011"]["reason"] == "exact_duplicate"
    assert all(by_key[k]["kept"] for k in corpus["photos"])


def test_broken_shards_and_repeated_keys_are_counted_not_fatal(corpus, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    whole = (corpus["root"] / "00000.tar").read_bytes()
    (src / "a.tar").write_bytes(whole)
    (src / "b.tar").write_bytes(whole[: len(whole) // 3])  # the same keys again, then the tar breaks off
    (src / "c.tar").write_bytes(b"<html>not a tar</html>")
    result = filter_corpus(filter_config_from_dict(job(src, tmp_path / "out")))
    c = result["manifest"]["counts"]["samples"]
    assert c["balanced"] and c["dropped"]["duplicate_key"] >= 1 and c["dropped"]["unreadable_shard"] >= 2
    assert result["summary"]["problems"]  # unreadable shards are reported, the rest is written
    index = pq.read_table(sorted((tmp_path / "out" / "index").glob("*.parquet"))).to_pylist()
    assert {r["reason"] for r in index if r["source_shard"].endswith("c.tar")} == {"unreadable_shard"}
    assert all(r["reason"] in ("duplicate_key", "unreadable_shard")
               for r in index if r["source_shard"].endswith("b.tar"))


def test_config_mistakes_are_one_line_errors(corpus, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(job(corpus["root"], tmp_path / "o", thresholds=[{"reward": "hpsv2", "min": 0}])))
    assert main(["filter", "--config", str(cfg)]) == 2
    assert "not in rewards" in capsys.readouterr().err
    assert main(["filter", "--config", str(cfg), "--set", "filter.thresholds=[]",
                 "--set", f"input.source={tmp_path}/nothing"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["filter", "--config", str(cfg), "--set", "input.sourse=x"]) == 2  # a typo'd key
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.input: unknown key(s) ['sourse']" in err and "'source'" in err


def test_progress_lines_count_shards_and_samples(corpus, tmp_path, caplog):
    """People watch long jobs: the read step logs shards done of the total (with time left), the score step samples."""
    import logging

    from synpref.transforms.corpus_sources import CorpusInput

    n_shards = len(CorpusInput().list_units([str(corpus["root"])]))
    with caplog.at_level(logging.INFO, logger="synpref.core.progress"):
        result = filter_corpus(filter_config_from_dict(job(corpus["root"], tmp_path / "out")))
    lines = [r.getMessage() for r in caplog.records if r.name == "synpref.core.progress"]
    assert f"[read] {n_shards}/{n_shards} shards (100%)" in "\n".join(lines), lines
    assert result["manifest"]["counts"]["samples"]["in"] >= n_shards
