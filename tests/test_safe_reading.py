"""Shards are untrusted input: reading one never unpickles, and unsafe names or bad images skip their sample."""
import io
import json
import pathlib
import pickle
import struct
import tarfile
import time
import zlib

import numpy as np
import pytest
import webdataset as wds
from PIL import Image, ImageFile

from synpref.reporting.inspect_build import scan_shard, verify
from synpref.training.config import TrainConfig
from synpref.training.data import RankedShards, iter_batches
from synpref.transforms.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, check_member_name, decode_image, decode_members


class TouchOnUnpickle:
    """Unpickling this creates ``path``: stands in for ``os.system`` in a crafted ``.pyd`` member."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


def png(seed: int = 0, size: int = 32, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side zeros: ~50 kB on disk, 400 MP (1.2 GB as RGB) once decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


BOMB = png_bomb()
HTML = b"<!DOCTYPE html><html><body>404 Not Found</body></html>"


def ranked(key: str, images: list[bytes], ext_prefix: str = "") -> list[tuple[str, bytes]]:
    """Members of one ranked sample in the README layout: ``<key>.json`` + ``<key>.img{i}.png``."""
    meta = {"prompt_id": key, "prompt": f"prompt {key}", "candidates": [
        {"candidate_id": f"{key}-{i}", "image": f"img{i}.png", "rank": i + 1, "phi": 1.0 - i / len(images)}
        for i in range(len(images))]}
    return [(f"{key}.json", json.dumps(meta).encode())] + [(f"{key}.img{i}.png", b) for i, b in enumerate(images)]


def write_tar(path, members: list[tuple[str, bytes]]) -> str:
    """Raw tarfile, so names WebDataset's TarWriter would never produce can be written."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def pickle_shard(tmp_path):
    marker = tmp_path / "pwned"
    members = ranked("k1", [png(1), png(2)]) + [("k1.pyd", pickle.dumps(TouchOnUnpickle(marker)))]
    return write_tar(tmp_path / "ranked-00000.tar", members), marker


def test_old_readme_snippet_runs_the_pickle(pickle_shard):
    """Sanity check that the payload is live: webdataset's default decoders unpickle .pyd."""
    path, marker = pickle_shard
    for _ in wds.WebDataset(path, shardshuffle=False).decode("pil"):
        pass
    assert marker.exists()


@pytest.mark.parametrize("reader", [
    lambda ds: ds.map(decode_members),  # the README snippet
    lambda ds: ds.decode("pil", only=["json", "img0.png", "img1.png"]),  # webdataset leaves unlisted keys as bytes
])
def test_safe_readers_never_unpickle(pickle_shard, reader):
    path, marker = pickle_shard
    (sample,) = list(reader(wds.WebDataset(path, shardshuffle=False)))
    assert sample["json"]["prompt"] == "prompt k1" and isinstance(sample["img0.png"], Image.Image)
    assert isinstance(sample["pyd"], bytes) and not marker.exists()


def test_trainer_reader_never_unpickles(pickle_shard):
    path, marker = pickle_shard
    assert [it.prompt_id for it in RankedShards([path], resolution=16)] == ["k1"]
    assert not marker.exists()


@pytest.fixture
def hostile_shard(tmp_path):
    members = (ranked("good1", [png(1), png(2)])
               + ranked("bomb", [png(3), BOMB])
               + ranked("../../evil", [png(4), png(5)])
               + ranked("/tmp/abs", [png(6), png(7)])
               + ranked("trunc", [png(8), png(9)[:200]])
               + ranked("html", [HTML, png(10)])
               + ranked("good2", [png(11), png(12)]))
    return write_tar(tmp_path / "ranked-00000.tar", members)


def test_trainer_skips_hostile_samples_and_keeps_training(hostile_shard):
    data = RankedShards([hostile_shard], resolution=16)
    assert [it.prompt_id for it in data] == ["good1", "good2"]
    assert dict(data.skipped) == {"too_many_pixels": 1, "unsafe_member_name": 2, "corrupt_image": 1,
                                  "not_an_image": 1}
    batches = iter_batches(data, batch_size=2)
    for _ in range(3):  # epochs go on over the hostile shard
        assert next(batches).prompt_ids == ["good1", "good2"]


def test_pixel_limit_is_a_config_knob(hostile_shard):
    assert TrainConfig(pretrained_model="m", shards=["s"], output_dir="o").max_image_pixels == DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels must be > 0"):
        TrainConfig(pretrained_model="m", shards=["s"], output_dir="o", max_image_pixels=0)
    data = RankedShards([hostile_shard], resolution=16, max_image_pixels=31 * 31)  # every 32x32 image is too big
    assert list(data) == [] and dict(data.skipped) == {"too_many_pixels": 4, "unsafe_member_name": 2, "not_an_image": 1}


def test_readme_snippet_refuses_unsafe_names_and_bombs(hostile_shard):
    ds = wds.WebDataset(hostile_shard, shardshuffle=False).map(decode_members, handler=wds.ignore_and_continue)
    assert [s["__key__"] for s in ds] == ["good1", "good2"]


def test_inspect_reports_unsafe_members(hostile_shard, tmp_path):
    good = write_tar(tmp_path / "pairs.tar", ranked("p1", [png(1)]))
    with tarfile.open(tmp_path / "link.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo(".hidden.png"), io.BytesIO(b""))
        link = tarfile.TarInfo("k.img0.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    assert scan_shard(good) == (1, [])
    n, unsafe = scan_shard(hostile_shard)
    assert n == 5 and len(unsafe) == 6 and all("unsafe member name '../../evil." in u or "'/tmp/abs." in u for u in unsafe)
    assert scan_shard(str(tmp_path / "link.tar"))[1] == [
        "unsafe member name '.hidden.png'", "member 'k.img0.png' is not a regular file"]
    manifest = {"shards": [{"ranked_tar": hostile_shard, "groups": 7, "pairs_tar": good, "pairs": 1}], "counts": {}}
    problems = verify(manifest)
    assert len(problems) == 7 and problems[-1].endswith("5 samples, manifest says 7")


@pytest.mark.parametrize("name", ["k1.json", "0a9f-gen_1-3.img0.png", "w1__l2.win.png", "k.tar.gz"])
def test_member_names_we_write_pass(name):
    assert check_member_name(name) == name


@pytest.mark.parametrize("name", ["../../x.png", "/etc/x.png", "a/b.png", ".hidden.png", "k..png", "k.", "noext",
                                  "k.png\n", "k .png", "k.png/..", "", None])
def test_unsafe_member_names_fail(name):
    with pytest.raises(ValueError, match="unsafe or malformed tar member name"):
        check_member_name(name)


@pytest.mark.parametrize("data, reason", [
    (png()[:200], "corrupt_image"),  # header intact, pixel data cut off
    (HTML, "not_an_image"),
    (b"", "not_an_image"),
    (png(fmt="TIFF"), "not_an_image"),  # a real image, but not a format synpref reads
])
def test_decode_image_reasons(data, reason):
    with pytest.raises(ImageDecodeError) as exn:
        decode_image(data)
    assert exn.value.reason == reason


def test_decode_image_checks_pixels_from_the_header(monkeypatch):
    assert decode_image(png_bomb(64)).size == (64, 64)  # the bomb is a valid PNG, just a big one
    assert len(BOMB) < 100_000
    assert decode_image(png(fmt="TIFF"), formats=("TIFF",)).size == (32, 32)
    with pytest.raises(ImageDecodeError, match=r"too_many_pixels: 32x32 = 1024 pixels > limit 1000"):
        decode_image(png(), max_pixels=1000)

    def no_decoding(self):
        raise AssertionError("decoded pixel data of an image over the limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for max_pixels in (DEFAULT_MAX_PIXELS, 1000):  # PIL's own bomb guard and ours
        start = time.perf_counter()
        with pytest.raises(ImageDecodeError) as exn:
            decode_image(BOMB if max_pixels == DEFAULT_MAX_PIXELS else png_bomb(64), max_pixels=max_pixels)
        assert exn.value.reason == "too_many_pixels" and time.perf_counter() - start < 1.0
