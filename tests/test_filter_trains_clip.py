"""A ``synpref filter`` output is a CLIP training set as it is: open_clip's own trainer data pipeline
(``open_clip_train.data.get_data``, train and val paths) and ``datasets``' webdataset builder read the kept
shards unchanged. Expected samples come from the input corpus (original bytes and captions), never from
the filter's output.
"""
import argparse
import glob
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from test_corpus_sources import images, make_tar
from test_filter_corpus import generated

SIDE = 64


@pytest.fixture(scope="module")
def filtered(tmp_path_factory):
    """A corpus in two shards with good samples, a truncated JPEG and an empty caption, filtered
    with a cheap reward and no thresholds: every good sample is kept, the bad ones are dropped."""
    root = tmp_path_factory.mktemp("trains-clip")
    good = {k: (data, f"caption of {k}".encode()) for k, data in images().items()}
    good["g009"] = (generated(9), "a caption with UTF-8: café, 東京".encode())
    bad = {"truncated": (good["p001"][0][:4000], b"half a photograph"), "no_caption": (generated(8), b"   ")}
    (root / "in").mkdir()
    make_tar(root / "in" / "00000.tar", {**dict(list(good.items())[:5]), **bad}, gz=False)
    make_tar(root / "in" / "00001.tar", dict(list(good.items())[5:]), gz=False)
    cfg = {"input": {"source": [str(root / "in")], "batch_size": 3}, "rewards": [{"name": "sharpness"}],
           "output": {"output_dir": str(root / "out"), "samples_per_shard": 3}}
    counts = filter_corpus(filter_config_from_dict(cfg))["manifest"]["counts"]["samples"]
    assert counts["written"] == len(good) and counts["dropped_total"] == len(bad)
    tars = sorted(glob.glob(str(root / "out" / "shards" / "*.tar")))
    return {"root": root, "good": good, "tars": tars}


def open_clip_args(tars, **kw):
    """The flags open_clip's trainer parses (``open_clip_train.params``), as its ``get_data`` reads them."""
    args = dict(train_data=None, val_data=None, dataset_type="webdataset", dataset_resampled=False,
                train_num_samples=None, val_num_samples=None, train_data_upsampling_factors=None, seed=0,
                workers=0, world_size=1, batch_size=1, imagenet_val=None, imagenet_v2=None)
    args.update(kw)
    return argparse.Namespace(**args)


def expected_batches(good):
    """caption tokens -> preprocessed image, from the input corpus, with open_clip's own eval transform."""
    import open_clip

    transform, tokenizer = open_clip.image_transform(SIDE, is_train=False), open_clip.get_tokenizer("ViT-B-32")
    return {tuple(tokenizer(caption.decode())[0].tolist()): transform(Image.open(io.BytesIO(data)).convert("RGB"))
            for data, caption in good.values()}


# open_clip's trainer data pipeline over the shards, as its training script builds it; prints nothing,
# saves {num_samples, split -> [(text tokens, image tensor)]} with torch.save to argv[2]
TRAINER_DATA = """
import argparse, sys, open_clip, torch
from open_clip_train.data import get_data
shards, out, side, splits = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
args = argparse.Namespace(train_data=shards if "train" in splits else None, val_data=shards if "val" in splits else None,
    dataset_type="webdataset", dataset_resampled=False, train_num_samples=None, val_num_samples=None,
    train_data_upsampling_factors=None, seed=0, workers=0, world_size=1, batch_size=1, imagenet_val=None,
    imagenet_v2=None)
transform = open_clip.image_transform(side, is_train=False)
data = get_data(args, (transform, transform), tokenizer=open_clip.get_tokenizer("ViT-B-32"))
result = {"num_samples": data["train"].dataloader.num_samples if "train" in data else None}
for split in splits:
    result[split] = [(t.tolist(), im) for ims, ts in data[split].dataloader for im, t in zip(ims, ts)]
torch.save(result, out)
"""


def run_trainer_data(python, tars, out, splits):
    import subprocess
    import sys

    # the shard list as open_clip takes one: "a::b::c" (the per-input-shard names are not one brace range)
    subprocess.run([python or sys.executable, "-c", TRAINER_DATA, "::".join(tars), str(out), str(SIDE),
                    ",".join(splits)], check=True)
    return torch.load(out)


def check_split(samples, expected):
    seen = {tuple(text): im for text, im in samples}
    assert len(seen) == len(samples) and set(seen) == set(expected)  # every kept sample once, dropped ones never
    for text, im in seen.items():
        assert torch.equal(im, expected[text])


def test_open_clip_eval_pipeline_and_dataset_size_read_the_kept_shards(filtered, tmp_path):
    """In this environment (webdataset >= 0.2.96): open_clip's validation pipeline and its dataset-size file."""
    from open_clip_train.data import get_dataset_size

    result = run_trainer_data(None, filtered["tars"], tmp_path / "val.pt", ["val"])
    check_split(result["val"], expected_batches(filtered["good"]))
    # the training length comes from shards/sizes.json: no --train-num-samples needed
    assert get_dataset_size("::".join(filtered["tars"])) == (len(filtered["good"]), len(filtered["tars"]))


@pytest.mark.skipif(not os.environ.get("SYNPREF_OPEN_CLIP_TRAIN_PYTHON"),
                    reason="set SYNPREF_OPEN_CLIP_TRAIN_PYTHON to a python with open_clip_torch[training] "
                           "(webdataset<=0.2.86): open_clip's training reader fails on newer webdataset")
def test_open_clip_training_pipeline_reads_the_kept_shards(filtered, tmp_path):
    """open_clip_torch[training] pins webdataset<=0.2.86: its training reader (``tarfile_to_samples_nothrow``)
    fails on the end-of-shard marker newer webdataset yields (webdataset#384, open_clip#935), whatever the
    data. So the training path runs in a python with open_clip's own pins."""
    result = run_trainer_data(os.environ["SYNPREF_OPEN_CLIP_TRAIN_PYTHON"], filtered["tars"], tmp_path / "t.pt",
                              ["train", "val"])
    assert result["num_samples"] == len(filtered["good"])  # from shards/sizes.json
    expected = expected_batches(filtered["good"])
    check_split(result["train"], expected)  # shuffled, every kept sample once per epoch
    check_split(result["val"], expected)


def test_datasets_webdataset_builder_reads_the_kept_shards(filtered, tmp_path):
    from datasets import load_dataset

    ds = load_dataset("webdataset", data_files={"train": filtered["tars"]}, split="train", cache_dir=str(tmp_path))
    assert len(ds) == len(filtered["good"])
    rows = {r["__key__"]: r for r in ds}
    assert set(rows) == set(filtered["good"])
    for key, (data, caption) in filtered["good"].items():
        r = rows[key]
        assert r["txt"] == caption.decode()
        assert np.array_equal(np.asarray(r["jpg"].convert("RGB")), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        assert np.isfinite(r["json"]["synpref_scores"]["sharpness"])
    sizes = json.loads((filtered["root"] / "out" / "shards" / "sizes.json").read_text())
    assert sizes == {t.rsplit("/", 1)[-1]: sum(1 for r in ds if r["__url__"] == t) for t in filtered["tars"]}
