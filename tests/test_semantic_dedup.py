"""``filter.semantic_dedup``: embeddings, k-means clusters and near-duplicate drops within a cluster.

The corpus: scikit-image's photographs (JPEG) in two shards, with planted near duplicates (a 92% crop, a
re-encode at JPEG quality 30, a colour shift, a brightness change) under other keys, one of them with a
key smaller than its original's. Expectations come from the inputs: with the non-learned ``thumbnail``
embedder, the planted pairs are what is dropped, naming the original; with a tiny random open_clip (whose
similarities mean nothing) the expected outcome is recomputed here with numpy from embeddings that this
test computes itself with open_clip's own loader and transform.
"""
import io
import json
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image, ImageEnhance

from synpref.cli import main
from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from synpref.transforms.embedders import EMBEDDERS, Embedder

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "moon", "brick",
          "grass")


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def crop(img: Image.Image, fraction: float) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * fraction), int(h * fraction)
    return img.crop(((w - cw) // 2, (h - ch) // 3, (w - cw) // 2 + cw, (h - ch) // 3 + ch))


def colour_shift(img: Image.Image) -> Image.Image:
    a = np.asarray(img.convert("RGB")).astype(int) + np.array([18, 0, -10])
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("semantic_corpus")
    photos = {n: Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in PHOTOS}
    images = {f"p{i:03d}": jpeg(photos[n]) for i, n in enumerate(PHOTOS)}
    # planted near duplicate -> the original it copies (the smaller key of the two is the one kept)
    planted = {"q100": ("p000", jpeg(crop(photos["astronaut"], 0.92).resize((480, 480)))),
               "q101": ("p001", jpeg(photos["coffee"], quality=30)),
               "q102": ("p002", jpeg(colour_shift(photos["chelsea"]))),
               "a000": ("p003", jpeg(ImageEnhance.Brightness(photos["rocket"]).enhance(1.15))),
               "q103": ("p004", jpeg(photos["camera"].resize((600, 600), Image.BICUBIC)))}  # more pixels
    for key, (_, data) in planted.items():
        images[key] = data
    with tarfile.open(root / "00000.tar", "w") as t0, tarfile.open(root / "00001.tar", "w") as t1:
        for n, key in enumerate(sorted(images)):
            tar = t0 if n % 2 == 0 else t1
            add(tar, f"{key}.jpg", images[key])
            add(tar, f"{key}.txt", f"caption of {key}".encode())
    # the dropped sample of each planted pair, and the key kept in its place
    expected = {max(k, orig): min(k, orig) for k, (orig, _) in planted.items()}
    return {"root": root, "images": images, "expected": expected}


def job(source, out, **semantic) -> dict:
    return {"input": {"source": [str(source)], "batch_size": 3},
            "rewards": [{"name": "resolution"}],
            "filter": {"semantic_dedup": semantic},
            "output": {"output_dir": str(out), "samples_per_shard": 4}}


def index_rows(out) -> dict:
    return {r["key"]: r for r in pq.read_table(sorted((out / "index").glob("*.parquet"))).to_pylist()}


def embeddings(out) -> dict[str, np.ndarray]:
    table = pq.read_table(sorted((out / "embeddings").glob("*.parquet")))
    return {k: np.asarray(e, dtype=np.float64) for k, e in zip(table.column("key").to_pylist(),
                                                               table.column("embedding").to_pylist())}


def greedy(vectors: dict[str, np.ndarray], threshold: float) -> dict[str, tuple[str, float]]:
    """All-pairs greedy by key (one cluster), written independently: dropped key -> (kept key, similarity)."""
    kept, dropped = [], {}
    for key in sorted(vectors):
        sims = {k: round(float(vectors[k] @ vectors[key]), 6) for k in kept}
        best = max(sims, key=lambda k: (sims[k], [-ord(c) for c in k])) if sims else None
        if best is not None and sims[best] >= threshold:
            dropped[key] = (best, sims[best])
        else:
            kept.append(key)
    return dropped


def all_files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "run_summary.json"}


THUMB = {"embedder": {"name": "thumbnail"}, "threshold": 0.8, "num_clusters": 3}


@pytest.fixture(scope="module")
def thumb_runs(corpus, tmp_path_factory):
    runs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp(f"semantic_{name}")
        result = filter_corpus(filter_config_from_dict(job(corpus["root"], out, **THUMB)))
        runs.append((out, result))
    return runs


def test_planted_near_duplicates_are_dropped_naming_the_kept_original(corpus, thumb_runs):
    out, result = thumb_runs[0]
    rows = index_rows(out)
    assert set(rows) == set(corpus["images"])
    dropped = {k: r for k, r in rows.items() if r["reason"] == "semantic_duplicate"}
    assert set(dropped) == set(corpus["expected"])  # every planted copy, and no distinct photograph
    for key, r in dropped.items():
        kept = corpus["expected"][key]
        assert r["stage"] == "dedup" and f"to kept key {kept} in " in r["detail"], r
        sim = float(r["detail"].split("cosine similarity ")[1].split()[0])
        vectors = embeddings(out)
        assert sim >= THUMB["threshold"] and sim == pytest.approx(float(vectors[key] @ vectors[kept]), abs=1e-6)
    c = result["manifest"]["counts"]["samples"]
    assert c["balanced"] and c["dropped"] == {"semantic_duplicate": len(corpus["expected"])}
    assert c["written"] == len(corpus["images"]) - len(corpus["expected"])
    drops = [json.loads(line) for p in sorted((out / "dead_letter").glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    assert {d["record_id"]: d["reason"] for d in drops} == {k: "semantic_duplicate" for k in corpus["expected"]}
    assert result["summary"]["counters"]["embeddings_computed"] == len(corpus["images"])


def test_embeddings_parquet_holds_every_sample_with_its_shard_and_the_thumbnail(corpus, thumb_runs):
    out, _ = thumb_runs[0]
    files = sorted((out / "embeddings").glob("*.parquet"))
    assert [f.name for f in files] == ["embeddings-00000.parquet", "embeddings-00001.parquet"]
    for i, f in enumerate(files):
        table = pq.read_table(f)
        assert table.column("key").to_pylist() == sorted(table.column("key").to_pylist())
        assert set(table.column("shard_index").to_pylist()) == {i}
        assert {os.path.basename(s) for s in table.column("source_shard").to_pylist()} == {f"{i:05d}.tar"}
        assert json.loads(table.schema.metadata[b"synpref_embedder"])["name"] == "thumbnail"
    vectors = embeddings(out)
    assert set(vectors) == set(corpus["images"])
    for key, data in corpus["images"].items():  # the thumbnail, computed here from the definition
        a = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((8, 8), Image.BOX), dtype=np.float64)
        v = (a - a.mean(axis=(0, 1))).reshape(-1)
        np.testing.assert_allclose(vectors[key], v / np.linalg.norm(v), atol=1e-6)


def test_two_runs_write_the_same_bytes(thumb_runs):
    (a, _), (b, _) = thumb_runs
    fa, fb = all_files(a), all_files(b)
    assert sorted(fa) == sorted(fb) and any(k.startswith("embeddings/") for k in fa)
    assert [k for k in fa if fa[k] != fb[k]] == []


def test_rerun_at_another_threshold_reuses_embeddings_and_a_changed_embedder_does_not(corpus, tmp_path):
    out = tmp_path / "out"
    first = filter_corpus(filter_config_from_dict(job(corpus["root"], out, **THUMB)))
    n = len(corpus["images"])
    assert first["summary"]["counters"]["embeddings_computed"] == n
    files = sorted((out / "embeddings").glob("*.parquet"))
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    loose = filter_corpus(filter_config_from_dict(job(corpus["root"], out, **{**THUMB, "threshold": 0.3})))
    counters = loose["summary"]["counters"]
    assert counters.get("embeddings_computed", 0) == 0 and counters["embeddings_reused"] == n
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files} == before  # not rewritten
    vectors = embeddings(out)
    rows = index_rows(out)
    dropped = {k for k, r in rows.items() if r["reason"] == "semantic_duplicate"}
    assert dropped > set(corpus["expected"])  # a lower threshold drops more, from the same embeddings
    expected_one_cluster = greedy(vectors, 0.3)
    one = filter_corpus(filter_config_from_dict(job(corpus["root"], out, **{**THUMB, "threshold": 0.3,
                                                                              "num_clusters": 1})))
    assert one["summary"]["counters"].get("embeddings_computed", 0) == 0
    rows = index_rows(out)
    assert {k: r["detail"].split(" in ")[0].split()[-1] for k, r in rows.items()
            if r["reason"] == "semantic_duplicate"} == {k: v[0] for k, v in expected_one_cluster.items()}
    changed = filter_corpus(filter_config_from_dict(job(corpus["root"], out, **{
        **THUMB, "embedder": {"name": "thumbnail", "params": {"side": 16}}})))
    assert changed["summary"]["counters"]["embeddings_computed"] == n
    assert changed["summary"]["counters"].get("embeddings_reused", 0) == 0
    assert embeddings(out)["p000"].shape == (3 * 16 * 16,)


def test_tiny_open_clip_embeddings_and_drops_match_an_independent_computation(corpus, tmp_path):
    """A random CLIP's similarities mean nothing, so the expectation is recomputed from its embeddings."""
    import open_clip
    import torch
    from safetensors.torch import load_file

    from synpref.demo.tiny_models import save_tiny_open_clip

    params = save_tiny_open_clip(tmp_path / "clip", seed=5)
    open_clip.add_model_config(params["model_config"])
    model, _, transform = open_clip.create_model_and_transforms(params["model"], pretrained=None)
    model.load_state_dict(load_file(params["checkpoint"]))
    model.eval()
    keys = sorted(corpus["images"])
    with torch.no_grad():
        x = torch.stack([transform(Image.open(io.BytesIO(corpus["images"][k])).convert("RGB")) for k in keys])
        ours = torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy().astype(np.float64)
    sims = sorted(float(ours[i] @ ours[j]) for i in range(len(keys)) for j in range(i + 1, len(keys)))
    threshold = round(sims[len(sims) * 3 // 4], 3)  # so that some samples go and some stay
    out = tmp_path / "out"
    semantic = {"embedder": {"name": "open_clip", "params": params}, "threshold": threshold, "num_clusters": 1}
    result = filter_corpus(filter_config_from_dict(job(corpus["root"], out, **semantic)))
    vectors = embeddings(out)
    np.testing.assert_allclose(np.stack([vectors[k] for k in keys]), ours, atol=1e-4)
    expected = greedy(vectors, threshold)
    assert 0 < len(expected) < len(keys) - 1
    rows = index_rows(out)
    got = {k: r["detail"] for k, r in rows.items() if r["reason"] == "semantic_duplicate"}
    assert set(got) == set(expected)
    for key, (kept, sim) in expected.items():
        assert f"cosine similarity {sim:.6f} >= {threshold} to kept key {kept} in " in got[key]
    assert result["manifest"]["counts"]["samples"]["balanced"]


@pytest.mark.parametrize("setting, message", [
    ("filter.semantic_dedup.threshold=0", "filter.semantic_dedup.threshold"),
    ("filter.semantic_dedup.threshold=1.5", "filter.semantic_dedup.threshold"),
    ("filter.semantic_dedup.embedder.name=nope", "unknown embedder 'nope'"),
    ("filter.semantic_dedup.embedder.params={model: ViT-Nope-1}", "unknown open_clip model 'ViT-Nope-1'"),
    ("filter.semantic_dedup.embedder.params={side: 1000}", "side must be an integer in [4, 64]"),
    ("filter.semantic_dedup.num_clusters=9", "sample_size (4) must be at least num_clusters (9)"),
    ("filter.semantic_dedup.keep_highest=clip", "keep_highest: reward 'clip' is not in rewards ['resolution']"),
])
def test_bad_semantic_dedup_settings_are_one_line_exit_2_before_any_work(corpus, tmp_path, capsys, setting,
                                                                          message):
    import yaml

    out = tmp_path / "out"
    cfg = job(corpus["root"], out, embedder={"name": "thumbnail"}, threshold=0.9, sample_size=4,
              num_clusters=2)
    if "params" in setting and "side" not in setting:
        cfg["filter"]["semantic_dedup"]["embedder"]["name"] = "open_clip"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc = main(["filter", "--config", str(path), "--set", setting])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (out / "embeddings").exists() and not (out / "manifest.json").exists()


def test_inspect_names_the_semantic_dedup_and_its_drops(thumb_runs, capsys):
    out, _ = thumb_runs[0]
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "semantic duplicates at cosine >= 0.8 (thumbnail embeddings, 3 clusters)" in text
    assert "semantic_duplicate" in text


def test_moved_shards_reuse_the_embeddings_and_rewrite_their_location(corpus, tmp_path):
    import shutil

    out = tmp_path / "out"
    filter_corpus(filter_config_from_dict(job(corpus["root"], out, **THUMB)))
    before = embeddings(out)
    moved = tmp_path / "moved"
    shutil.copytree(corpus["root"], moved)
    again = filter_corpus(filter_config_from_dict(job(moved, out, **THUMB)))
    assert again["summary"]["counters"].get("embeddings_computed", 0) == 0
    table = pq.read_table(sorted((out / "embeddings").glob("*.parquet")))
    assert {os.path.dirname(s) for s in table.column("source_shard").to_pylist()} == {str(moved)}
    after = embeddings(out)
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)


def test_keep_highest_keeps_the_best_scored_copy(corpus, tmp_path):
    """By resolution, the upscaled camera (600x600) is kept over its 512x512 original; ties keep the smaller key."""
    out = tmp_path / "out"
    filter_corpus(filter_config_from_dict(job(corpus["root"], out, **THUMB, keep_highest="resolution")))
    expected = {**{k: v for k, v in corpus["expected"].items() if k != "q103"}, "p004": "q103"}
    rows = index_rows(out)
    got = {k: r["detail"].split(" to kept key ")[1].split()[0] for k, r in rows.items()
           if r["reason"] == "semantic_duplicate"}
    assert got == expected


def _planted_clusters(n_centres=6, per=40, dim=32, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_centres), per)
    x = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return centres, labels, x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kmeans_finds_planted_centres_whatever_the_input_order():
    from synpref.transforms.semantic_dedup import fit_centroids

    centres, _, x = _planted_clusters()
    sample = [(f"r{i:04d}", f"k{i:04d}", x[i].astype(np.float32)) for i in range(len(x))]
    fitted = fit_centroids(sample, len(centres), 20, seed=3)
    assert fitted.shape == centres.shape
    np.testing.assert_allclose(np.linalg.norm(fitted, axis=1), 1.0, atol=1e-9)
    assert (fitted @ centres.T).max(axis=0).min() > 0.99  # every planted centre has a centroid on it
    assert np.array_equal(fit_centroids(sample[::-1], len(centres), 20, seed=3), fitted)
    assert fit_centroids([], 4, 20, 0) is None


def test_semantic_dedup_step_on_hand_set_embeddings_matches_greedy_per_planted_cluster():
    """Beam TestPipeline over records with hand-set embeddings: groups far apart, so k-means keeps each
    planted group in one cluster and the expected drops are the greedy pass within each group."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from synpref.schemas.records import CorpusRecord
    from synpref.transforms.semantic_dedup import SemanticDedup

    centres, labels, x = _planted_clusters(n_centres=4, per=12, dim=16, noise=0.1, seed=1)
    rng = np.random.default_rng(2)
    keys = [f"{k:05d}" for k in rng.permutation(len(x))]
    items = [(CorpusRecord(key=k, shard_index=0, source_shard="s.tar"), x[i].astype(np.float32))
             for i, k in enumerate(keys)]
    vectors = {k: x[i].astype(np.float32).astype(np.float64) for i, k in enumerate(keys)}
    threshold = 0.93
    expected = {}
    for g in range(len(centres)):
        expected.update(greedy({k: vectors[k] for i, k in enumerate(keys) if labels[i] == g}, threshold))
    assert 0 < len(expected) < len(keys) - len(centres)
    with TestPipeline() as p:
        out = (p | beam.Create(items)
               | SemanticDedup(threshold, num_clusters=len(centres), sample_size=len(items), seed=0))
        assert_that(out["kept"] | "KeptKeys" >> beam.Map(lambda r: r.key),
                    equal_to(sorted(set(keys) - set(expected))), label="Kept")
        assert_that(out["dropped"] | "DropNames" >> beam.Map(
            lambda r: (r.key, r.dropped.detail.split(" to kept key ")[1].split()[0])),
            equal_to(sorted((k, v[0]) for k, v in expected.items())), label="Dropped")


@EMBEDDERS.register("test_raising_embedder")
class RaisingEmbedder(Embedder):
    """Fails on every call after loading, as a model that runs out of memory would."""

    def embed(self, images):
        raise RuntimeError("CUDA out of memory (planted)")


def test_an_embedder_that_raises_drops_its_samples_as_embedding_error_and_the_ledger_balances(corpus, tmp_path):
    out = tmp_path / "out"
    result = filter_corpus(filter_config_from_dict(job(corpus["root"], out, embedder={"name": "test_raising_embedder"},
                                                       threshold=0.9, num_clusters=2)))
    c = result["manifest"]["counts"]["samples"]
    assert c["balanced"] and c["written"] == 0 and c["dropped"] == {"embedding_error": len(corpus["images"])}
    rows = index_rows(out)
    assert {r["stage"] for r in rows.values()} == {"embed"}
    assert all("CUDA out of memory (planted)" in r["detail"] for r in rows.values())
    assert not list((out / "embeddings").glob("*.parquet"))  # nothing cached for a failed call
