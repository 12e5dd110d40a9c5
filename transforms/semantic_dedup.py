"""Semantic deduplication as SemDeDup does it (Abbas et al. 2023, arXiv 2303.09540, section 3), as Beam steps.

1. ``SeededSample``: at most ``sample_size`` embeddings, those with the smallest sha256(seed, key) (Beam's
   ``Top`` combiner: a bounded heap per worker, deterministic, unlike ``Sample.FixedSizeGlobally``).
2. ``FitCentroids``: spherical k-means (Lloyd's algorithm on unit vectors, cosine assignment) over that
   sample on one worker; the ``num_clusters`` x dim centroids are a small side input.
3. ``AssignClusters``: each embedding to its most similar centroid, in parallel.
4. ``DedupWithinCluster``: one cluster per group; members visited by key (smallest first; or by one
   reward's score, highest first, ties by key, with ``keep_highest``); a member whose
   cosine similarity to an already kept member is at least ``threshold`` is dropped as
   ``semantic_duplicate`` naming the most similar kept key and the similarity; otherwise it is kept.

No step holds every embedding: the sample is bounded and a group holds one cluster. Near duplicates that
land in different clusters are not compared (SemDeDup's approximation; more clusters = smaller groups,
fewer comparisons, a little lower recall). k-means is a few lines of numpy (float64, fixed order, seeded
k-means++ initialisation) rather than scikit-learn, which is not a dependency and whose threaded Lloyd step can
reduce in a thread-count-dependent order.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import apache_beam as beam
import numpy as np

from .corpus_scoring import DROPPED


def sample_rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def nearest(x: np.ndarray, centroids: np.ndarray, block: int = 4096) -> np.ndarray:
    """Index of each row's most similar centroid, ``block`` rows at a time (never an n x k matrix)."""
    return np.concatenate([np.argmax(x[i:i + block] @ centroids.T, axis=1) for i in range(0, len(x), block)])


def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k rows of ``x``: the first uniformly, each next with probability proportional to its cosine distance
    to the nearest one chosen (uniformly again once every row coincides with a chosen one)."""
    chosen = [int(rng.integers(len(x)))]
    distance = np.clip(1.0 - x @ x[chosen[0]], 0.0, None)
    for _ in range(1, k):
        total = distance.sum()
        i = int(rng.choice(len(x), p=distance / total)) if total > 0 else int(rng.integers(len(x)))
        chosen.append(i)
        distance = np.minimum(distance, np.clip(1.0 - x @ x[i], 0.0, None))
    return x[chosen].copy()


def fit_centroids(sample: list, num_clusters: int, iterations: int, seed: int) -> Optional[np.ndarray]:
    """Spherical k-means over ``sample`` ([(rank, key, embedding)]); unit-row float64 centroids, or None if empty.

    Initial centroids by k-means++ (Arthur and Vassilvitskii 2007) over cosine distance, drawn by a
    generator seeded with ``seed`` (k passes over the sample, as many as k/n Lloyd iterations); an empty
    cluster keeps its centroid. Stops early when no assignment changes.
    """
    if not sample:
        return None
    x = np.stack([np.asarray(e, dtype=np.float64) for _, _, e in sorted(sample, key=lambda s: s[:2])])
    centroids = _kmeans_plus_plus(x, min(num_clusters, len(x)), np.random.default_rng(seed))
    labels = None
    for _ in range(iterations):
        new = nearest(x, centroids)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        order = np.argsort(labels, kind="stable")  # members of each cluster together, in sample order
        sorted_labels = labels[order]
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
        sums = centroids.copy()  # an empty cluster keeps its centroid
        sums[sorted_labels[starts]] = np.add.reduceat(x[order], starts, axis=0)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        centroids = np.where(norms > 0, sums / np.where(norms > 0, norms, 1.0), centroids)
    return centroids


def _assign(item, centroids: Optional[np.ndarray]):
    rec, emb = item
    return int(np.argmax(centroids @ np.asarray(emb, dtype=np.float64))), (rec, emb)


def _visit_order(keep_highest: Optional[str]):
    if keep_highest is None:
        return lambda m: (m[0].key, m[0].source_shard)
    return lambda m: (-m[0].scores[keep_highest], m[0].key, m[0].source_shard)


def _dedup_cluster(element, threshold: float, keep_highest: Optional[str] = None):
    cluster, members = element
    members = sorted(members, key=_visit_order(keep_highest))
    kept_vectors = np.zeros((len(members), len(members[0][1])), dtype=np.float64)
    kept = []
    for rec, emb in members:
        v = np.asarray(emb, dtype=np.float64)
        if kept:
            sims = kept_vectors[:len(kept)] @ v
            j = int(np.argmax(sims))
            sim = round(float(sims[j]), 6)  # rounded: the decision does not hang on the last bits of a dot product
            if sim >= threshold:
                yield beam.pvalue.TaggedOutput(DROPPED, rec.drop(
                    "semantic_duplicate", "dedup", f"cosine similarity {sim:.6f} >= {threshold} to kept key "
                    f"{kept[j].key} in {kept[j].source_shard} (cluster {cluster})"))
                continue
        kept_vectors[len(kept)] = v
        kept.append(rec)
        yield rec


class SemanticDedup(beam.PTransform):
    """(record, unit embedding) pairs -> {"kept": records, "dropped": semantic duplicates} (module docstring).

    Args:
        threshold: cosine similarity (rounded to 6 decimals) at or above which a sample duplicates a kept one.
        num_clusters: k of k-means (fewer if the sample is smaller).
        sample_size: embeddings the centroids are fitted on.
        iterations: at most this many Lloyd iterations.
        seed: picks the sample and the initial centroids.
        keep_highest: a reward name: members are visited by its score, highest first (then key), so the
            best-scored of a group of near duplicates is kept; None: by key, the smallest kept.
    """

    def __init__(self, threshold: float, *, num_clusters: int = 64, sample_size: int = 50_000, iterations: int = 20,
                 seed: int = 0, keep_highest: Optional[str] = None):
        super().__init__()
        self.threshold, self.num_clusters, self.sample_size = threshold, num_clusters, sample_size
        self.iterations, self.seed, self.keep_highest = iterations, seed, keep_highest

    def expand(self, embedded):
        seed = self.seed
        centroids = (embedded
                     | "RankForSample" >> beam.Map(lambda it: (sample_rank(seed, it[0].key), it[0].key, it[1]))
                     | "SeededSample" >> beam.combiners.Top.Smallest(self.sample_size, key=lambda s: s[:2])
                     | "FitCentroids" >> beam.Map(fit_centroids, self.num_clusters, self.iterations, seed))
        out = (embedded
               | "AssignClusters" >> beam.Map(_assign, beam.pvalue.AsSingleton(centroids))
               | "GroupByCluster" >> beam.GroupByKey()
               | "DedupWithinCluster" >> beam.FlatMap(_dedup_cluster, self.threshold, self.keep_highest)
               .with_outputs(DROPPED, main="kept"))
        return {"kept": out.kept, "dropped": out[DROPPED]}
