"""Corpus inputs that reach outside the corpus or that readers would split wrongly (issue 21, section 5).

A Parquet corpus whose ``path`` column names files outside its folder (``../``, an absolute path, a symlink)
and keys with dots, filtered by ``synpref filter``; the output read back with the ``webdataset`` library.
"""
import io
import json
import os
import tarfile
import urllib.parse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from synpref.reporting.inspect_build import collect_report
from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_paths_outside_the_corpus_are_dropped_and_dotted_keys_read_back_whole(tmp_path):
    corpus, outside, allowed = tmp_path / "corpus", tmp_path / "secret", tmp_path / "shared"
    for d in (corpus / "sub", outside, allowed):
        d.mkdir(parents=True)
    secret = png(99)
    (outside / "secret.png").write_bytes(secret)
    (corpus / "inside.png").write_bytes(png(1))
    (corpus / "sub/two.png").write_bytes(png(2))
    (allowed / "ok.png").write_bytes(png(3))
    os.symlink(outside / "secret.png", corpus / "link.png")
    rows = [  # key, path, whether it may be read
        ("a.b.c", "inside.png", True),              # a key with dots
        ("k2", "sub/../sub/two.png", True),
        ("k3", str(allowed / "ok.png"), True),      # absolute, under input.parquet.allowed_roots
        ("k4", "../secret/secret.png", False),
        ("k5", str(outside / "secret.png"), False),
        ("k6", "link.png", False),                  # a symlink out of the folder
        ("k7", "file://" + str(outside / "secret.png"), False),
    ]
    pq.write_table(pa.table({"key": [r[0] for r in rows], "path": [r[1] for r in rows],
                             "caption": [f"caption {r[0]}" for r in rows]}), corpus / "part-0.parquet")
    out = tmp_path / "out"
    cfg = filter_config_from_dict({
        "input": {"source": [str(corpus / "part-0.parquet")], "parquet": {"allowed_roots": [str(allowed)]}},
        "rewards": [{"name": "resolution"}], "output": {"output_dir": str(out)}})
    manifest = filter_corpus(cfg)["manifest"]

    samples = manifest["counts"]["samples"]
    assert samples["dropped"] == {"path_outside_corpus": 4} and samples["written"] == 3 and samples["balanced"]
    drops = [json.loads(line) for f in sorted((out / "dead_letter").glob("*.jsonl")) for line in open(f)]
    assert sorted(d["record_id"] for d in drops if d["reason"] == "path_outside_corpus") == ["k4", "k5", "k6", "k7"]

    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    read = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert set(read) == {"a%2Eb%2Ec", "k2", "k3"}
    dotted = read["a%2Eb%2Ec"]
    assert {"png", "txt", "json"} <= set(dotted) and dotted["txt"] == b"caption a.b.c"
    assert urllib.parse.unquote("a%2Eb%2Ec") == "a.b.c" == json.loads(dotted["json"])["synpref_source"]["key"]
    assert all(secret not in s.get("png", b"") for s in read.values())
    assert collect_report(str(out)).findings == []

    # the same shard written with the raw dotted key (as before): inspect names it
    tar = next(t for t in tars if b"a%2Eb%2Ec" in open(t, "rb").read())
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tar, "w") as dst:
        for m, data in members:
            m.name = m.name.replace("a%2Eb%2Ec", "a.b.c")
            dst.addfile(m, io.BytesIO(data))
    findings = collect_report(str(out)).findings
    assert any("sample 'a' reads back with members" in f and "does not split back whole" in f for f in findings), \
        findings
