"""Candidate-level filters within one prompt's group, applied before ranking (docs/math.md, "Candidate filters").

Pixels exist only in the scoring step, so it computes each image's small facts there
(``image_facts``: difference hash, grey-level sd, flat share) and they travel on the ``Candidate``
record. ``filter_group`` then decides, from those facts and the scores, in this order:

0. ``below_threshold`` / ``above_threshold`` (candidate): a score outside a bound of
   ``filter.candidate_thresholds`` (e.g. ``nsfw`` above 0); the detail names reward, score and bound.
1. ``degenerate_image`` (candidate): grey-level sd < ``filter.min_grey_sd``, or more than
   ``filter.max_flat_share`` of the pixels within ``FLAT_TOLERANCE`` levels (every channel) of the
   image's per-channel median colour: blank, black (safety-checker output), one flat colour, or one
   colour with a small mark on it.
2. ``low_diversity_group`` (prompt; its candidates ``group_dropped``): with at least two candidates
   left, every pair within ``filter.low_diversity_distance`` bits of each other's hash.
3. ``near_duplicate_candidate`` (candidate): in candidate-id order, a candidate within
   ``filter.near_duplicate_candidate_distance`` bits of an earlier kept one is dropped, naming it;
   so the kept one is always the smallest id of its cluster (deterministic, independent of scores).

A candidate without facts (``dhash`` empty, e.g. built by hand) or without a thresholded score
passes every check it lacks facts for. Too few candidates left afterwards is the ranking step's ``too_few_candidates``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageChops

from ..schemas.records import Candidate
from .perceptual_hash import dhash_hex, hamming
from .rewards.near_blank import grey_std

STAGE = "filter_candidates"
FLAT_TOLERANCE = 8  # grey levels per channel (0..255) around the median colour that still count as "flat"


def flat_share(image: Image.Image, tolerance: int = FLAT_TOLERANCE) -> float:
    """Share of pixels whose every channel is within ``tolerance`` of the image's per-channel median.

    When one colour covers more than half the image, the per-channel median is that colour, so this
    is its share (noise up to ``tolerance`` included); it is only a useful threshold above 0.5.
    Pillow's histogram and lookup tables keep it in C (about 3 ms for a megapixel).
    """
    rgb = image.convert("RGB")
    hist = rgb.histogram()  # 3 x 256 bins
    half = (rgb.width * rgb.height + 1) // 2
    masks = []
    for band, counts in zip(rgb.split(), (hist[0:256], hist[256:512], hist[512:768])):
        median = int(np.searchsorted(np.cumsum(counts), half))  # the lower median, exactly
        masks.append(band.point([255 if abs(v - median) <= tolerance else 0 for v in range(256)]))
    near = ImageChops.darker(ImageChops.darker(masks[0], masks[1]), masks[2])  # 255 where all three are
    return near.histogram()[255] / float(rgb.width * rgb.height)


def image_facts(image: Image.Image) -> dict:
    """The facts the candidate filters need, computed where the pixels are (the scoring step)."""
    return {"dhash": dhash_hex(image), "grey_sd": grey_std(image), "flat_share": flat_share(image)}


@dataclass(frozen=True)
class GroupVerdict:
    """What ``filter_group`` decided for one prompt: the kept candidates, the dropped ones as
    (candidate, reason, detail), and, for a dropped group, the prompt-level reason and detail."""

    kept: tuple[Candidate, ...]
    dropped: tuple[tuple[Candidate, str, str], ...] = ()
    group_reason: str = ""
    group_detail: str = ""


def degenerate(c: Candidate, min_grey_sd: float, max_flat_share: Optional[float]) -> str:
    """Why ``c`` is a degenerate image ('' if it is not, or has no facts)."""
    if c.grey_sd is not None and c.grey_sd < min_grey_sd:
        return f"grey-level sd {c.grey_sd:.3f} < {min_grey_sd}"
    if max_flat_share is not None and c.flat_share is not None and c.flat_share > max_flat_share:
        return f"flat share {c.flat_share:.4f} > {max_flat_share} (within {FLAT_TOLERANCE} levels of one colour)"
    return ""


def out_of_bounds(c: Candidate, thresholds) -> tuple[str, str]:
    """(reason, detail) of the first ``ScoreThreshold`` that ``c``'s scores break, else ('', '')."""
    for t in thresholds:
        if t.reward in c.scores:
            reason, detail = t.violation(c.scores[t.reward])
            if reason:
                return reason, detail
    return "", ""


def filter_group(candidates: Sequence[Candidate], cfg) -> GroupVerdict:
    """Apply the candidate filters of ``cfg`` (a ``FilterConfig``) to one prompt's candidates."""
    candidates = sorted(candidates, key=lambda c: c.candidate_id)
    dropped: list[tuple[Candidate, str, str]] = []
    kept: list[Candidate] = []
    for c in candidates:
        reason, why = out_of_bounds(c, cfg.candidate_thresholds)
        if not reason:
            reason, why = "degenerate_image", degenerate(c, cfg.min_grey_sd, cfg.max_flat_share)
        if why:
            dropped.append((c, reason, why))
        else:
            kept.append(c)
    hashed = [c for c in kept if c.dhash]
    limit = cfg.low_diversity_distance
    if limit is not None and len(kept) >= 2 and len(hashed) == len(kept):
        widest = max(hamming(a.dhash, b.dhash) for a, b in itertools.combinations(kept, 2))
        if widest <= limit:
            detail = f"every pair of its {len(kept)} candidates within {widest} <= {limit} bits (dhash)"
            return GroupVerdict((), tuple(dropped) + tuple((c, "group_dropped", "low_diversity_group")
                                                          for c in kept), "low_diversity_group", detail)
    near = cfg.near_duplicate_candidate_distance
    if near is not None:
        unique: list[Candidate] = []
        for c in kept:
            match = next(((k, d) for k in unique if c.dhash and k.dhash
                          for d in [hamming(c.dhash, k.dhash)] if d <= near), None)
            if match is None:
                unique.append(c)
            else:
                dropped.append((c, "near_duplicate_candidate",
                                f"dhash within {match[1]} <= {near} bits of kept candidate {match[0].candidate_id}"))
        kept = unique
    return GroupVerdict(tuple(kept), tuple(dropped))
