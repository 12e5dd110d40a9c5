"""Precision and recall of ``filter.semantic_dedup`` on a corpus with planted near duplicates.

    flock /work/wt/bench.lock .venv/bin/python bench/bench_semantic_dedup.py [--originals 160]
        [--dup-fraction 0.35] [--thresholds 0.6,0.7,0.8,0.9] [--clusters 1,8] [--embedder thumbnail,tiny_clip]

The corpus (img2dataset's tar layout, 2 shards): distinct originals are tiles of scikit-image's photographs
(each photograph cut into a grid of non-overlapping tiles) and generated patterns; a fraction of them get
one or two planted copies: a crop (80-95% of each side), a re-encode at JPEG quality 15-40, a colour shift
(up to +-20 per channel) or a brightness change (0.8-1.2x), each resized a little. Keys are shuffled, so a
copy's key is sometimes smaller than its original's. Ground truth: a drop is correct when the dropped
sample and the kept key it names are copies of the same original; recall = correct drops / (samples -
groups), precision = correct drops / drops.

Embedders (``--embedder``): ``thumbnail`` is the non-learned baseline (8x8 colour thumbnails, mean removed:
cosine = correlation), so its figures mean what they say about these edits and nothing about meaning.
``tiny_clip`` is a tiny open_clip with random weights (what the tests use): its figures are MEANINGLESS as
quality and are printed only to show the same machinery runs a CLIP model; a real run names a pretrained
open_clip model (``{name: open_clip, params: {model: ViT-B-32, pretrained: laion2b_s34b_b79k}}``), which
needs its weights (not available offline here).

Each embedder runs once with embedding (timed against the same job without semantic dedup, in the same
process), then at every other threshold / cluster count reusing the embeddings Parquet, timed against a
rerun of the job without semantic dedup (both reuse the scoring cache).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image, ImageEnhance

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
          "retina", "moon", "coins", "page", "horse", "clock", "text")


def _tiles() -> list[Image.Image]:
    """Non-overlapping tiles of every photograph (a 2x2 grid; 3x3 for the large ones)."""
    import skimage.data

    out = []
    for name in PHOTOS:
        arr = getattr(skimage.data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr).convert("RGB")
        n = 3 if min(img.size) >= 800 else 2
        w, h = img.width // n, img.height // n
        out += [img.crop((i * w, j * h, (i + 1) * w, (j + 1) * h)) for j in range(n) for i in range(n)]
    return out


def _pattern(i: int) -> Image.Image:
    rng = np.random.default_rng(1000 + i)
    yy, xx = np.mgrid[0:192, 0:256] / 25.0
    f = rng.uniform(0.3, 2.0, 6)
    base = np.stack([np.sin(xx * f[0] + yy * f[1] + i), np.cos(yy * f[2] - xx * f[3]),
                     np.sin(xx * yy * f[4] / 4 + f[5])], -1)
    return Image.fromarray(np.clip(127 + 100 * base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _copy(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    if kind == "crop":
        f = rng.uniform(0.8, 0.95, 2)
        cw, ch = int(img.width * f[0]), int(img.height * f[1])
        x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
        img = img.crop((x, y, x + cw, y + ch))
    elif kind == "colour":
        a = np.asarray(img).astype(int) + rng.integers(-20, 21, 3)
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    elif kind == "brightness":
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    scale = float(rng.uniform(0.8, 1.1))
    img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.BICUBIC)
    return _jpeg(img, int(rng.integers(15, 41)) if kind == "reencode" else 90)


def build_corpus(root: str, n_originals: int, dup_fraction: float, seed: int = 0) -> tuple[dict, dict]:
    """Writes 00000.tar and 00001.tar; returns key -> group (the original's index), key -> edit ("original",
    "crop", "reencode", "colour", "brightness")."""
    rng = np.random.default_rng(seed)
    tiles = _tiles()
    originals = [tiles[i] if i < len(tiles) else _pattern(i) for i in range(n_originals)]
    samples: list[tuple[int, str, bytes]] = []
    for g, img in enumerate(originals):
        samples.append((g, "original", _jpeg(img)))
        if rng.random() < dup_fraction:
            for kind in rng.choice(["crop", "reencode", "colour", "brightness"], size=int(rng.integers(1, 3)),
                                   replace=False):
                samples.append((g, str(kind), _copy(img, str(kind), rng)))
    order = rng.permutation(len(samples))
    groups, kinds = {}, {}
    os.makedirs(root, exist_ok=True)
    with tarfile.open(f"{root}/00000.tar", "w") as t0, tarfile.open(f"{root}/00001.tar", "w") as t1:
        for rank, idx in enumerate(order):
            key = f"{rank:06d}"
            g, kinds[key], data = samples[idx]
            groups[key] = g
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", f"sample {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                (t0 if rank % 2 == 0 else t1).addfile(info, io.BytesIO(payload))
    return groups, kinds


def missed_by_edit(out: str, groups: dict[str, int], kinds: dict[str, str]) -> dict[str, str]:
    """Per edit: planted copies of a group still holding two or more kept samples / copies of that edit."""
    import pyarrow.parquet as pq

    kept = [r["key"] for r in pq.read_table(os.path.join(out, "index")).to_pylist() if r["kept"]]
    per_group: dict[int, list[str]] = {}
    for k in kept:
        per_group.setdefault(groups[k], []).append(k)
    missed, total = {}, {}
    for k, kind in kinds.items():
        if kind != "original":
            total[kind] = total.get(kind, 0) + 1
            if k in kept and len(per_group[groups[k]]) > 1:
                missed[kind] = missed.get(kind, 0) + 1
    return {kind: f"{missed.get(kind, 0)}/{n}" for kind, n in sorted(total.items())}


def score(out: str, groups: dict[str, int]) -> tuple[float, float, int]:
    import pyarrow.parquet as pq

    rows = pq.read_table(os.path.join(out, "index")).to_pylist()
    drops = {r["key"]: r["detail"].split(" to kept key ")[1].split()[0] for r in rows
             if r["reason"] == "semantic_duplicate"}
    correct = sum(groups[k] == groups[kept] for k, kept in drops.items())
    should = len(groups) - len(set(groups.values()))
    return (correct / len(drops) if drops else 1.0), correct / should, len(drops)


def run_job(source: str, out: str, embedder: dict | None, threshold: float = 0.9, clusters: int = 8):
    from synpref.pipelines.filter_corpus import filter_corpus
    from synpref.schemas.filter_config import filter_config_from_dict

    filt = {"semantic_dedup": {"embedder": embedder, "threshold": threshold, "num_clusters": clusters}} \
        if embedder else {}
    cfg = {"input": {"source": [source], "batch_size": 16}, "rewards": [{"name": "resolution"}], "filter": filt,
           "output": {"output_dir": out, "samples_per_shard": 1000}}
    start = time.perf_counter()
    result = filter_corpus(filter_config_from_dict(cfg))
    return time.perf_counter() - start, result["summary"]["counters"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--originals", type=int, default=160)
    p.add_argument("--dup-fraction", type=float, default=0.35)
    p.add_argument("--thresholds", default="0.6,0.7,0.8,0.9")
    p.add_argument("--clusters", default="1,8", help="k-means cluster counts to compare (1 = all pairs)")
    p.add_argument("--embedder", default="thumbnail,tiny_clip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="")
    args = p.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_semdedup_")
    groups, kinds = build_corpus(f"{work}/corpus", args.originals, args.dup_fraction, args.seed)
    n_groups = len(set(groups.values()))
    print(f"corpus: {len(groups)} samples, {n_groups} distinct originals, {len(groups) - n_groups} planted copies "
          f"(2 shards); workdir {work}")
    run_job(f"{work}/corpus", f"{work}/warmup", None)  # imports and Beam's first-run costs
    fresh, _ = run_job(f"{work}/corpus", f"{work}/baseline", None)
    cached, _ = run_job(f"{work}/corpus", f"{work}/baseline", None)  # a rerun: scores come from _cache/
    print(f"baseline job without semantic dedup: {fresh:.2f} s fresh, {cached:.2f} s rerun (scores cached)")
    thresholds = [float(t) for t in args.thresholds.split(",")]
    clusters = [int(c) for c in args.clusters.split(",")]
    for name in args.embedder.split(","):
        if name == "tiny_clip":
            from synpref.demo.tiny_models import save_tiny_open_clip

            embedder = {"name": "open_clip", "params": save_tiny_open_clip(f"{work}/tiny_clip")}
            label = "tiny_clip (open_clip, RANDOM weights: precision/recall meaningless)"
        else:
            embedder = {"name": name}
            label = f"{name} (non-learned baseline)" if name == "thumbnail" else name
        out = f"{work}/out_{name}"
        print(f"\n{label}")
        print(f"  {'threshold':>9} {'clusters':>8} {'drops':>6} {'precision':>9} {'recall':>7} {'seconds':>8} "
              f"{'x baseline':>10} embeddings")
        for i, (k, t) in enumerate((k, t) for k in clusters for t in thresholds):
            secs, counters = run_job(f"{work}/corpus", out, embedder, t, k)
            prec, rec, drops = score(out, groups)
            how = (f"computed {counters.get('embeddings_computed', 0)}, reused {counters.get('embeddings_reused', 0)}")
            base = fresh if i == 0 else cached  # the first run scores and embeds; reruns reuse both
            print(f"  {t:>9.2f} {k:>8d} {drops:>6d} {prec:>9.3f} {rec:>7.3f} {secs:>8.2f} {secs / base:>9.2f}x {how}")
            sys.stdout.flush()
        print(f"  copies left with their original, by edit (last run): {missed_by_edit(out, groups, kinds)}")


if __name__ == "__main__":
    main()
