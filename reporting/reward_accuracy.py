"""``synpref eval-rewards``: how often each reward, and the job's aggregate of them, agrees with humans.

Input: a preference set in the Pick-a-Pic v2 schema (parquet: ``caption``, ``jpg_0``, ``jpg_1`` image
bytes, ``label_0`` = 1 when image 0 is preferred, 0 when image 1 is, 0.5 for a tie). Ties are
skipped; so are rows whose images do not decode (counted). A reward's accuracy counts a pair as
right when it scores the preferred image strictly higher, half when it scores both the same, and
leaves the pair out when a score is not finite. The aggregate ranks each pair's two images with
the job's aggregator (Syn-Pic by default) over all rewards, with the same rule.

Aggregators that need dataset statistics (``mean_bt``, ``mean_zscore`` with ``zscore_scope:
dataset``, ``reliability_weighted``) get them from a first pass: every pair is scored once and its
2 x n score table kept (numbers only, no pixels); the statistics are computed over all pairs whose
scores are finite, each pair being one group of two images, with the accumulators the build's Beam
combines use (``aggregators.dataset_stats``); then every pair is labelled with them.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow.parquet as pq

from ..core.errors import error_text
from ..formats.pickapic import PICKAPIC_COLUMNS, image_bytes, parquet_files
from ..schemas.config import BuildConfig
from ..transforms.aggregators import dataset_stats, get_aggregator
from ..transforms.ranking import label_table
from ..transforms.imageio import ImageDecodeError, decode_image
from ..core.fileio import dumps_strict
from ..transforms.rewards import create_reward
from ..transforms.scoring import score_ensemble

COLUMNS = PICKAPIC_COLUMNS


def read_pairs(location: str, batch_rows: int = 64) -> Iterator[list[dict[str, Any]]]:
    """Row batches of the preference parquet(s) at ``location`` (a file, a glob or a folder, as Pick-a-Pic v2
    is published); streamed: no file is ever held in memory whole."""
    for path in parquet_files(location):
        with fsspec.open(path, "rb") as f:
            try:
                pf = pq.ParquetFile(f)
            except Exception as e:  # not Parquet at all: a user mistake, one line
                raise ValueError(f"{path} is not a readable Parquet file ({error_text(e)})") from None
            missing = [c for c in COLUMNS if c not in pf.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; expected the Pick-a-Pic v2 schema {list(COLUMNS)}")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(COLUMNS)):
                yield batch.to_pylist()


def _credit(a: float, b: float, label_0: float) -> float | None:
    """1 right, 0.5 a tie in the scores, 0 wrong, None when a score is not finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    if a == b:
        return 0.5
    return 1.0 if (a > b) == (label_0 == 1.0) else 0.0


def evaluate(cfg: BuildConfig, pairs_path: str, batch_rows: int = 64) -> dict[str, Any]:
    """Pairwise accuracy of every reward of ``cfg`` and of its aggregator on a human-labelled set."""
    rewards = [create_reward(r.name, r.params) for r in cfg.rewards]
    for r in rewards:
        r.load()
    agg, names = cfg.ranking.aggregator, [r.name for r in rewards]
    need = get_aggregator(agg).needs_stats({"zscore_scope": cfg.ranking.zscore_scope})
    tables: list[tuple[np.ndarray, float]] = []  # (2 x n finite scores, label_0) per usable pair
    credit: dict[str, list[float]] = {r.name: [] for r in rewards}
    credit["aggregate"] = []
    skipped = {"tie": 0, "bad_label": 0, "bad_image": 0}
    for rows in read_pairs(pairs_path, batch_rows):
        images, prompts, labels = [], [], []
        for row in rows:
            label = row["label_0"]
            if label == 0.5:
                skipped["tie"] += 1
                continue
            if label not in (0, 1, 0.0, 1.0):
                skipped["bad_label"] += 1
                continue
            try:
                pair = [decode_image(image_bytes(row[k])) for k in ("jpg_0", "jpg_1")]
            except (ImageDecodeError, TypeError):
                skipped["bad_image"] += 1
                continue
            images += pair
            prompts += [row["caption"] or ""] * 2
            labels.append(float(label))
        if not labels:
            continue
        scores = score_ensemble(rewards, images, prompts)
        for name, s in scores.items():
            if isinstance(s, str):
                raise RuntimeError(f"reward {name} failed: {s}")
        table = np.array([scores[r.name] for r in rewards], dtype=np.float64).T  # [2 * pairs, n_rewards]
        for i, label in enumerate(labels):
            for j, r in enumerate(rewards):
                c = _credit(table[2 * i, j], table[2 * i + 1, j], label)
                if c is not None:
                    credit[r.name].append(c)
            pair = table[2 * i:2 * i + 2]
            if np.isfinite(pair).all():
                tables.append((pair, label))
    stats = dataset_stats([t for t, _ in tables], names, need) if need and tables else None
    for pair, label in tables:
        phi, _ = label_table(pair, names, agg, cfg.ranking.reward_weights, stats, cfg.ranking.zscore_scope)
        credit["aggregate"].append(_credit(float(phi[0]), float(phi[1]), label))
    rows = [{"name": name, "accuracy": (sum(v) / len(v)) if v else None, "pairs": len(v)}  # None: no pair
            for name, v in credit.items()]
    return {"pairs_file": pairs_path, "aggregator": cfg.ranking.aggregator, "results": rows, "skipped": skipped,
            "dataset_stats": {need: stats} if stats else {}}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"pairwise accuracy against human labels: {report['pairs_file']}",
             f"{'reward':<28} {'accuracy':>8} {'pairs':>7}"]
    for row in report["results"]:
        name = f"{report['aggregator']} (all rewards)" if row["name"] == "aggregate" else row["name"]
        acc = "n/a" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"{name:<28} {acc:>8} {row['pairs']:>7}")
    lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in report["skipped"].items()))
    stats = report.get("dataset_stats", {})
    if "reliability" in stats:
        lines.append("estimated reward weights: " + ", ".join(
            f"{r}={w:.3f}" for r, w in stats["reliability"]["weight"].items()))
    if "moments" in stats:
        lines.append("reward sd over the pairs' images: " + ", ".join(
            f"{r}={v:.4g}" for r, v in stats["moments"]["sd"].items()))
    return "\n".join(lines)


def no_usable_pair(report: dict[str, Any]) -> str:
    """Why nothing could be measured ("" when some pair was scored): the CLI exits 1 with this line."""
    if any(row["pairs"] for row in report["results"]):
        return ""
    skipped = ", ".join(f"{k}={v}" for k, v in report["skipped"].items())
    return (f"no pair in {report['pairs_file']} could be scored (skipped: {skipped}; a reward with a "
            "non-finite score counts no pair): nothing to measure")


def write_json(report: dict[str, Any], path: str) -> None:
    with fsspec.open(path, "w") as f:
        f.write(dumps_strict(report, indent=2, sort_keys=True))
