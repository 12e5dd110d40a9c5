"""``synpref filter`` input sources: Parquet tables (image bytes or paths) and gzip-compressed tar shards.

Each corpus is built here from scikit-image's photographs and generated images; expectations come from
the inputs themselves (which rows are bad, the original bytes, PIL's own sizes), never from the filter.
"""
import gzip
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from synpref.cli import main
from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from synpref.transforms.corpus_sources import CorpusInput, TarSource
from test_filter_corpus import HTML, PHOTOS, add, generated, jpeg, read_tar, sample

REWARDS = [{"name": "resolution", "params": {"unit": "pixels"}}, {"name": "colourfulness"}]


def job(source, out, **inp) -> dict:
    return {"input": {"source": [str(source)], "batch_size": 3, **inp}, "rewards": REWARDS,
            "output": {"output_dir": str(out), "samples_per_shard": 4}}


def images() -> dict[str, bytes]:
    out = {f"p{i:03d}": jpeg(Image.fromarray(getattr(skimage.data, n)())) for i, n in enumerate(PHOTOS)}
    out.update({f"g{i:03d}": generated(i) for i in range(4)})
    return out


def kept_samples(out) -> dict[str, dict[str, bytes]]:
    kept = {}
    for p in sorted((out / "shards").glob("*.tar")):
        kept.update(read_tar(p))
    return kept


def index_rows(out) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(sorted((out / "index").glob("*.parquet"))).to_pylist()}


def check_kept(out, originals: dict[str, bytes], captions: dict[str, str], manifest: dict):
    """Every kept sample has its original bytes, caption and a pixel count PIL reads from those bytes."""
    kept = kept_samples(out)
    counts = manifest["counts"]["samples"]
    assert counts["balanced"] and len(kept) == counts["written"]
    for key, members in kept.items():
        (ext,) = [e for e in members if e not in ("txt", "json")]
        assert members[ext] == originals[key] and members["txt"] == captions[key].encode("utf-8")
        w, h = Image.open(io.BytesIO(originals[key])).size
        assert json.loads(members["json"])["synpref_scores"]["resolution"] == w * h
    return kept


def test_parquet_with_image_bytes_in_img2dataset_columns(tmp_path):
    imgs = images()
    rows = [{"key": k, "caption": f"caption of {k}", "url": f"https://example.com/{k}.jpg", "status": "success",
             "jpg": data} for k, data in sorted(imgs.items())]
    rows.append({"key": "bad_html", "caption": "a page", "url": "u", "status": "success", "jpg": HTML})
    rows.append({"key": "no_caption", "caption": None, "url": "u", "status": "success", "jpg": imgs["g000"]})
    rows.append({"key": "no_image", "caption": "nothing here", "url": "u", "status": "failed_to_download",
                 "jpg": None})
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:6]), src / "part-0.parquet", row_group_size=4)
    pq.write_table(pa.Table.from_pylist(rows[6:]), src / "part-1.parquet", row_group_size=2)
    out = tmp_path / "out"
    result = filter_corpus(filter_config_from_dict(job(src, out, parquet={"batch_rows": 2})))
    m = result["manifest"]
    assert m["counts"]["samples"]["in"] == len(rows)
    idx = index_rows(out)
    assert {k: idx[k]["reason"] for k in ("bad_html", "no_caption", "no_image")} == {
        "bad_html": "not_an_image", "no_caption": "missing_caption", "no_image": "missing_image"}
    kept = check_kept(out, imgs, {k: f"caption of {k}" for k in imgs}, m)
    assert set(kept) == set(imgs)  # no_caption has g000's bytes but is dropped before dedup sees it
    meta = json.loads(kept["p000"]["json"])
    assert meta["url"] == "https://example.com/p000.jpg" and meta["status"] == "success" and "jpg" not in meta


def test_parquet_with_relative_paths_and_a_missing_file(tmp_path):
    imgs = images()
    root = tmp_path / "in"
    (root / "images").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rows = []
    for i, (k, data) in enumerate(sorted(imgs.items())):
        if i == 0:  # an absolute path outside the table's folder
            (elsewhere / f"{k}.jpg").write_bytes(data)
            path = str(elsewhere / f"{k}.jpg")
        else:
            (root / "images" / f"{k}.jpg").write_bytes(data)
            path = f"images/{k}.jpg"
        rows.append({"id": k, "text": f"caption of {k}", "image_path": path})
    rows.append({"id": "gone", "text": "its file was never downloaded", "image_path": "images/gone.jpg"})
    pq.write_table(pa.Table.from_pylist(rows), root / "table.parquet", row_group_size=3)
    out = tmp_path / "out"
    result = filter_corpus(filter_config_from_dict(job(root / "table.parquet", out, parquet={
        "path_column": "image_path", "caption_column": "text", "key_column": "id", "batch_rows": 2,
        "allowed_roots": [str(elsewhere)]})))  # the absolute path outside the table's folder is allowed explicitly
    idx = index_rows(out)
    assert idx["gone"]["reason"] == "unreadable_image_path" and "images/gone.jpg" in idx["gone"]["detail"]
    kept = check_kept(out, imgs, {k: f"caption of {k}" for k in imgs}, result["manifest"])
    assert set(kept) == set(imgs)
    assert json.loads(kept["g001"]["json"])["image_path"] == "images/g001.jpg"


def test_parquet_with_a_hugging_face_image_column_and_odd_values(tmp_path):
    imgs = images()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "g001.jpg").write_bytes(imgs["g001"])
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "key": ["p000", "g001", "strange"],
        "caption": ["caption of p000", "caption of g001", "an image column of the wrong type"],
        "image": pa.array([{"bytes": imgs["p000"], "path": None}, {"bytes": None, "path": "images/g001.jpg"},
                           {"bytes": None, "path": None}], type=image_type)})
    pq.write_table(table, tmp_path / "hf.parquet")
    text_image = pa.table({"key": ["text_image"], "caption": ["c"], "image": ["not bytes at all"]})
    pq.write_table(text_image, tmp_path / "odd.parquet")
    out = tmp_path / "out"
    result = filter_corpus(filter_config_from_dict(job(tmp_path, out, parquet={"image_column": "image"})))
    idx = index_rows(out)
    assert (idx["strange"]["reason"], idx["text_image"]["reason"]) == ("missing_image", "not_an_image")
    kept = check_kept(out, imgs, {k: f"caption of {k}" for k in imgs}, result["manifest"])
    assert set(kept) == {"p000", "g001"}


def photo_corpus(src):
    """One tar of the test photographs with captions, plus one truncated JPEG; returns the folder."""
    imgs = images()
    samples = {k: (data, f"caption of {k}".encode()) for k, data in imgs.items()}
    samples["truncated"] = (imgs["p001"][: len(imgs["p001"]) // 2], b"half a photograph")
    src.mkdir()
    make_tar(src / "00000.tar", samples, gz=False)
    return src


def make_tar(path, samples: dict[str, tuple[bytes, bytes]], gz: bool):
    with (gzip.GzipFile(path, "wb", mtime=0) if gz else open(path, "wb")) as raw, tarfile.open(fileobj=raw, mode="w") as t:
        for key in sorted(samples):
            for name, data in sample(key, *samples[key]):
                add(t, name, data)


def test_tar_gz_shards_beside_img2dataset_metadata_match_plain_tars(tmp_path):
    imgs = images()
    samples = {f"{i:09d}": (data, f"caption {k}".encode()) for i, (k, data) in enumerate(sorted(imgs.items()))}
    samples["000000100"] = (imgs["p001"][:3000], b"truncated")
    keys = sorted(samples)
    runs = {}
    for kind in ("tar", "tar.gz"):
        src = tmp_path / kind
        src.mkdir()
        make_tar(src / f"00000.{kind}", {k: samples[k] for k in keys[:5]}, kind == "tar.gz")
        make_tar(src / f"00001.{kind}", {k: samples[k] for k in keys[5:]}, kind == "tar.gz")
        for n in ("00000", "00001"):  # img2dataset's per-shard files: listed beside the shards, never read
            pq.write_table(pa.table({"key": keys[:2], "status": ["success"] * 2}), src / f"{n}.parquet")
            (src / f"{n}_stats.json").write_text("{}")
        out = tmp_path / f"out_{kind}"
        assert main(["filter", "--config", str(write_yaml(tmp_path / f"{kind}.yaml", job(src, out)))]) == 0
        runs[kind] = out
    gz, plain = runs["tar.gz"], runs["tar"]
    assert index_rows(gz)["000000100"]["reason"] == "corrupt_image"
    check_kept(gz, {k: v[0] for k, v in samples.items()}, {k: v[1].decode() for k, v in samples.items()},
               json.loads((gz / "manifest.json").read_text()))
    # the same samples, decisions and scores as the uncompressed shards; the kept bytes are identical
    strip = lambda rows: {k: {c: v for c, v in r.items() if c != "source_shard"} for k, r in rows.items()}  # noqa
    assert strip(index_rows(gz)) == strip(index_rows(plain))
    assert {k: {e: v for e, v in m.items() if e != "json"} for k, m in kept_samples(gz).items()} == \
        {k: {e: v for e, v in m.items() if e != "json"} for k, m in kept_samples(plain).items()}


def test_gzip_reader_finds_members_in_any_order(tmp_path):
    samples = {f"k{i}": (generated(i), b"c") for i in range(4)}
    make_tar(tmp_path / "s.tar.gz", samples, gz=True)
    url = str(tmp_path / "s.tar.gz")
    found = {k: (m["jpg"][1], m["jpg"][2]) for k, m, _ in TarSource().iter_samples(url)}
    reader = TarSource().open_images(url)
    try:
        for key in ("k3", "k0", "k2", "k2", "k1"):  # backwards reopens the stream
            assert reader.read(f"{key}.jpg", *found[key]) == samples[key][0]
    finally:
        reader.close()


def test_parquet_reader_jumps_to_the_row_group_of_any_row(tmp_path):
    from synpref.transforms.corpus_sources import ParquetSource

    blobs = [generated(i) for i in range(10)]
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(10)], "caption": ["c"] * 10, "jpg": blobs}),
                   tmp_path / "t.parquet", row_group_size=3)
    source = ParquetSource(batch_rows=2)
    rows = {k: m["jpg"][1] for k, m, _ in source.iter_samples(str(tmp_path / "t.parquet"))}
    assert rows == {f"k{i}": i for i in range(10)}
    reader = source.open_images(str(tmp_path / "t.parquet"))
    try:
        for i in (9, 0, 5, 5, 2, 8, 3):
            assert reader.read("", i, len(blobs[i])) == blobs[i]
    finally:
        reader.close()


def write_yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


def test_input_mistakes_are_one_line_errors(tmp_path, capsys):
    pq.write_table(pa.table({"key": ["a"], "jpg": [b"x"]}), tmp_path / "t.parquet")
    cfg = write_yaml(tmp_path / "j.yaml", job(tmp_path / "t.parquet", tmp_path / "o"))
    assert main(["filter", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no caption column 'caption'" in err and len(err.splitlines()) == 1
    assert main(["filter", "--config", str(cfg), "--set", "input.format=zip"]) == 2
    assert "input.format must be auto or one of" in capsys.readouterr().err
    assert main(["filter", "--config", str(cfg), "--set", "input.format=tar"]) == 2
    assert "holds no .tar/.tar.gz/.tgz file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["filter", "--config", str(cfg), "--set", f"input.source={tmp_path}/empty"]) == 2
    assert "holds no" in capsys.readouterr().err


def test_auto_format_reads_tars_when_a_folder_holds_both(tmp_path):
    make_tar(tmp_path / "00000.tar", {"a": (generated(1), b"c")}, gz=False)
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "00000.parquet")
    assert CorpusInput().list_units([str(tmp_path)]) == [str(tmp_path / "00000.tar")]
    assert CorpusInput("parquet").list_units([str(tmp_path)]) == [str(tmp_path / "00000.parquet")]
    (tmp_path / "00000.tar").unlink()
    assert CorpusInput().list_units([str(tmp_path)]) == [str(tmp_path / "00000.parquet")]


def test_shipped_filter_jobs_validate():
    import pathlib

    from synpref.schemas.filter_config import load_filter_config

    for name in ("demo_filter", "filter_laion"):
        cfg = load_filter_config(str(pathlib.Path(__file__).parents[1] / "jobs" / f"{name}.yaml"),
                                 ["input.source=elsewhere"])
        assert cfg.input.source == ("elsewhere",) and cfg.input.format == "auto"


def test_fsspec_urls_for_tars_and_parquet_paths(tmp_path):
    """``memory://`` stands in for s3:// / gs://: listing, relative image paths and the writer's re-reads."""
    import fsspec

    imgs = images()
    fs = fsspec.filesystem("memory")
    root = f"memory://corpus-{tmp_path.name}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for k in sorted(imgs)[:4]:
            for name, data in sample(k, imgs[k], f"caption of {k}".encode()):
                add(t, name, data)
    fs.pipe(f"{root}/tars/00000.tar", buf.getvalue())
    for k in sorted(imgs)[4:]:
        fs.pipe(f"{root}/table/images/{k}.jpg", imgs[k])
    table = io.BytesIO()
    pq.write_table(pa.table({"key": sorted(imgs)[4:], "caption": [f"caption of {k}" for k in sorted(imgs)[4:]],
                             "path": [f"images/{k}.jpg" for k in sorted(imgs)[4:]]}), table)
    fs.pipe(f"{root}/table/part.parquet", table.getvalue())
    units = CorpusInput().list_units([f"{root}/tars", f"{root}/table/*.parquet"])
    assert [u.split("corpus-", 1)[-1] for u in units] == [f"{tmp_path.name}/table/part.parquet",
                                                          f"{tmp_path.name}/tars/00000.tar"]
    assert all(u.startswith("memory://") for u in units)
    cfg = job(f"{root}/tars", tmp_path / "out")
    cfg["input"]["source"].append(f"{root}/table")
    result = filter_corpus(filter_config_from_dict(cfg))
    assert set(check_kept(tmp_path / "out", imgs, {k: f"caption of {k}" for k in imgs}, result["manifest"])) == \
        set(imgs)


def test_jpeg_draft_only_when_every_reward_shrinks_images_first(tmp_path):
    """A CLIP reward (tiny open_clip, 64 px input) allows 1/2..1/8-scale JPEG decoding; sharpness does not."""
    from synpref.demo.tiny_models import save_tiny_open_clip

    clip = {"name": "clip_score", "params": {**save_tiny_open_clip(tmp_path / "clip"), "variant": "cosine"}}
    imgs, src = images(), photo_corpus(tmp_path / "in")
    runs = {}
    for name, rewards, draft in (("full", [clip], False), ("draft", [clip], True),
                                 ("with_sharpness", [clip, {"name": "sharpness"}], True)):
        cfg = job(src, tmp_path / name, jpeg_draft=draft)
        cfg["rewards"] = rewards
        assert filter_corpus(filter_config_from_dict(cfg))["manifest"]["counts"]["samples"]["balanced"]
        runs[name] = index_rows(tmp_path / name)
    for rows in runs.values():
        assert rows["truncated"]["reason"] == "corrupt_image"  # damaged data is still found at reduced scale
        for k, data in imgs.items():  # the original size is recorded, not the decoded one
            assert (rows[k]["width"], rows[k]["height"]) == Image.open(io.BytesIO(data)).size
    full, draft = ({k: runs[n][k]["score_clip_score"] for k in imgs} for n in ("full", "draft"))
    assert {k: runs["with_sharpness"][k]["score_clip_score"] for k in imgs} == full  # sharpness: full size
    # close (here <= 0.002 of cosine, scores spread over 0.07) but not equal: the draft path was taken
    assert all(abs(full[k] - draft[k]) < 0.005 for k in imgs) and any(full[k] != draft[k] for k in imgs)
