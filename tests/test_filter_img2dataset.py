"""``synpref filter`` on corpora made by img2dataset itself, from images served on 127.0.0.1.

img2dataset pins ``webdataset<0.3`` and ``pandas<3`` (ours are newer), so it cannot live in our venv:
install it in a venv of its own (``python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset``)
and set ``SYNPREF_IMG2DATASET=/tmp/i2d/bin/img2dataset``; without it these tests skip. The images
are scikit-image's photographs and generated patterns; the URL list also names a missing file (404)
and an HTML page saved as ``.jpg``, which img2dataset itself drops (status in its Parquet).
"""
import functools
import http.server
import os
import shutil
import subprocess
import threading

import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from test_filter_corpus import HTML, PHOTOS, generated, jpeg, read_tar

IMG2DATASET = os.environ.get("SYNPREF_IMG2DATASET") or shutil.which("img2dataset")
pytestmark = pytest.mark.skipif(not IMG2DATASET, reason="img2dataset not installed (it pins webdataset<0.3 and "
                                "pandas<3): install it in its own venv and set SYNPREF_IMG2DATASET")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A folder of images on a local HTTP server; yields (base URL, {name: caption})."""
    root = tmp_path_factory.mktemp("www")
    captions = {}
    for name in PHOTOS:
        (root / f"{name}.jpg").write_bytes(jpeg(Image.fromarray(getattr(skimage.data, name)())))
        captions[f"{name}.jpg"] = f"a photograph: {name}"
    for i in range(3):
        (root / f"pattern{i}.jpg").write_bytes(generated(i))
        captions[f"pattern{i}.jpg"] = f"a generated pattern {i}"
    (root / "page.jpg").write_bytes(HTML)
    captions["page.jpg"] = "an HTML page saved as .jpg"
    captions["missing.jpg"] = "a file the server does not have"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", captions
    server.shutdown()


def run_img2dataset(served, tmp_path, output_format: str):
    base, captions = served
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\n" + "".join(f"{base}/{n},{c}\n" for n, c in sorted(captions.items())))
    out = tmp_path / f"i2d_{output_format}"
    subprocess.run([IMG2DATASET, f"--url_list={urls}", "--input_format=csv", "--url_col=url",
                    "--caption_col=caption", f"--output_format={output_format}", f"--output_folder={out}",
                    "--processes_count=1", "--thread_count=2", "--image_size=128", "--resize_mode=keep_ratio",
                    "--number_sample_per_shard=4", "--enable_wandb=False", "--retries=0", "--timeout=5"],
                   check=True, capture_output=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    status = pq.read_table(sorted(out.glob("*.parquet"))).to_pylist()
    return out, {r["key"]: r for r in status}


def job(source, out) -> dict:
    return {"input": {"source": [str(source)]}, "rewards": [{"name": "resolution"}, {"name": "sharpness"}],
            "output": {"output_dir": str(out), "samples_per_shard": 3}}


def test_webdataset_output_of_img2dataset(served, tmp_path):
    i2d, status = run_img2dataset(served, tmp_path, "webdataset")
    ok = {k for k, r in status.items() if r["status"] == "success"}
    assert len(ok) == len(PHOTOS) + 3  # img2dataset dropped the 404 and the HTML page itself
    shards = {}
    for p in sorted(i2d.glob("*.tar")):
        shards.update(read_tar(p))
    result = filter_corpus(filter_config_from_dict(job(i2d, tmp_path / "out")))  # .parquet/_stats.json beside
    c = result["manifest"]["counts"]["samples"]
    assert c["balanced"] and c["in"] == len(ok) == c["written"]
    kept = {}
    for p in sorted((tmp_path / "out" / "shards").glob("*.tar")):
        kept.update(read_tar(p))
    assert set(kept) == ok
    for key, members in kept.items():
        assert members["jpg"] == shards[key]["jpg"] and members["txt"] == shards[key]["txt"]


def test_parquet_output_of_img2dataset_with_default_columns(served, tmp_path):
    i2d, status = run_img2dataset(served, tmp_path, "parquet")
    ok = {k: r for k, r in status.items() if r["status"] == "success"}
    result = filter_corpus(filter_config_from_dict(job(i2d, tmp_path / "out")))
    c = result["manifest"]["counts"]["samples"]
    assert c["balanced"] and c["in"] == len(status) and c["written"] == len(ok)
    kept = {}
    for p in sorted((tmp_path / "out" / "shards").glob("*.tar")):
        kept.update(read_tar(p))
    assert {k: m["jpg"] for k, m in kept.items()} == {k: r["jpg"] for k, r in ok.items()}
    index = pq.read_table(sorted((tmp_path / "out" / "index").glob("*.parquet"))).to_pylist()
    assert {r["key"] for r in index if r["reason"] == "missing_image"} == set(status) - set(ok)
