"""Candidate filters before ranking: planted blank/flat images, a near-duplicate pair, a low-diversity group.

A test-only generator returns planted images (by prompt and candidate index), so a real build runs
end to end. Expected drops are derived here from the planted pixels with this file's own numpy
difference hash and statistics, not from synpref's functions.
"""
import glob
import itertools
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
from synpref.schemas.records import Lineage
from synpref.transforms.generators import register_generator
from synpref.transforms.generators.base import Generator
from synpref.transforms.generators.procedural import procedural_image
from synpref.transforms.prompts import prompt_id_of
from test_build_e2e import digests

K = 4


def distinct(prompt: str, i: int) -> np.ndarray:
    return (procedural_image(prompt, 1000 + i, 64, 64) * 255).round().astype(np.uint8)


def jitter(px: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-2, 3, px.shape)
    return np.clip(px.astype(int) + noise, 0, 255).astype(np.uint8)


def flat(value) -> np.ndarray:
    return np.full((64, 64, 3), value, dtype=np.uint8)


def planted() -> dict[str, list[np.ndarray]]:
    base = distinct("lowdiv", 0)
    small_mark = flat((40, 90, 160))
    small_mark[10:15, 20:25] = 255  # 25 of 4096 pixels: 99.4% one colour, grey sd ~ 8
    return {
        "blank": [flat(128), distinct("blank", 1), distinct("blank", 2), distinct("blank", 3)],
        "flat mark": [distinct("flat mark", 0), small_mark, distinct("flat mark", 2), distinct("flat mark", 3)],
        "dup": [distinct("dup", 0), distinct("dup", 1), jitter(distinct("dup", 0), 7), distinct("dup", 3)],
        "lowdiv": [base, jitter(base, 1), jitter(base, 2), jitter(base, 3)],
        "collapse": [flat(0), flat(255), flat((30, 200, 30)), distinct("collapse", 3)],
        "normal": [distinct("normal", i) for i in range(K)],
    }


PLANTED = planted()


@register_generator("test_planted")
class PlantedGenerator(Generator):
    """One call = one prompt's K seeds in candidate order: image i of the prompt's planted list."""

    def load(self):
        pass

    def generate(self, prompts, seeds):
        return [PLANTED[p][i % K].astype(np.float32) / 255.0 for i, p in enumerate(prompts)]

    def files(self):
        return {}

    def lineage(self, seed):
        return Lineage(generator_id=self.config.id, model=self.config.model, revision="main",
                       pipeline_class="planted", scheduler="none", num_inference_steps=0, guidance_scale=0.0,
                       height=64, width=64, dtype="float32", seed=int(seed))


# ---- the test's own reference: difference hash bits and image statistics in numpy

def bits(px: np.ndarray) -> np.ndarray:
    grey = np.asarray(Image.fromarray(px).convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=float)
    return (grey[:, 1:] > grey[:, :-1]).ravel()


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int((bits(a) != bits(b)).sum())


def grey_sd(px: np.ndarray) -> float:
    return float(np.asarray(Image.fromarray(px).convert("L"), dtype=float).std())


def largest_colour_share(px: np.ndarray) -> float:
    _, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
    return counts.max() / counts.sum()


def expected(images: list[np.ndarray], min_sd=2.0, max_flat=0.99, low_div=8, near=4):
    """(candidate drops {index: reason}, group reason) by the rules in docs/math.md, from the pixels."""
    drops = {i: "degenerate_image" for i, px in enumerate(images)
             if grey_sd(px) < min_sd or largest_colour_share(px) > max_flat}
    kept = [i for i in range(K) if i not in drops]
    if low_div is not None and len(kept) >= 2 and max(distance(images[a], images[b])
                                                      for a, b in itertools.combinations(kept, 2)) <= low_div:
        return {**drops, **{i: "group_dropped" for i in kept}}, "low_diversity_group"
    unique = []
    for i in kept:
        if near is not None and any(distance(images[i], images[u]) <= near for u in unique):
            drops[i] = "near_duplicate_candidate"
        else:
            unique.append(i)
    if len(unique) < 2:
        return {**drops, **{i: "group_dropped" for i in unique}}, "too_few_candidates"
    return drops, ""


def job(out, **filter_cfg):
    return build_config_from_dict(job_dict(out, PLANTED, **filter_cfg))


def job_dict(out, prompt_texts, **filter_cfg) -> dict:
    """The planted build's config as a dict (other tests change its rewards or ranking)."""
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("\n".join(prompt_texts) + "\n")
    return {
        "seed": 0, "candidates_per_generator": K,
        "prompts": {"source": str(prompts)},
        "generators": [{"id": "plant", "type": "test_planted", "model": "synpref/planted", "height": 64, "width": 64}],
        "rewards": [{"name": "sharpness"}, {"name": "colourfulness"}],
        "filter": filter_cfg,
        "output": {"output_dir": str(out), "samples_per_shard": 2, "staging": "keep"},
    }


def dead_letters(out) -> list[dict]:
    return [json.loads(line) for f in glob.glob(f"{out}/dead_letter/*.jsonl") for line in open(f)]


def test_planted_preconditions():
    """The planted images are what the test claims (else the build test would prove little)."""
    n = PLANTED["normal"]
    assert min(distance(a, b) for a, b in itertools.combinations(n, 2)) > 8
    assert distance(PLANTED["dup"][0], PLANTED["dup"][2]) <= 4
    assert 2.0 < grey_sd(PLANTED["flat mark"][1]) and largest_colour_share(PLANTED["flat mark"][1]) > 0.99
    assert max(distance(a, b) for a, b in itertools.combinations(PLANTED["lowdiv"], 2)) <= 8


@pytest.mark.parametrize("filter_cfg", [{}, {"low_diversity_distance": None}], ids=["defaults", "no_low_diversity"])
def test_candidate_filters_drop_what_was_planted_and_the_ledger_balances(tmp_path, filter_cfg):
    out = tmp_path / "out"
    result = build(job(out, **filter_cfg))
    assert not result["summary"]["problems"], result["summary"]["problems"]
    counts = result["manifest"]["counts"]
    letters = dead_letters(out)
    ids = {prompt_id_of(p): p for p in PLANTED}

    want_candidates, want_prompts, pairs_in, images_written = {}, {}, 0, 0
    for prompt, images in PLANTED.items():
        drops, group = expected(images, **({"low_div": None} if filter_cfg else {}))
        for i, reason in drops.items():
            want_candidates[(prompt, i)] = reason
        if group:
            want_prompts[prompt] = group
        else:
            kept = K - len(drops)
            images_written += kept
            pairs_in += kept * (kept - 1) // 2
    got_candidates = {(ids[d["record_id"].rsplit("-", 2)[0]], int(d["record_id"].rsplit("-", 1)[1])): d["reason"]
                      for d in letters if d["level"] == "candidate"}
    assert got_candidates == want_candidates
    got_prompts = {d["detail"].split()[1].rstrip(":"): d["reason"] for d in letters if d["level"] == "prompt"}
    assert {ids[k]: v for k, v in got_prompts.items()} == want_prompts

    # the test's own expectations, spelled out for the default run
    if not filter_cfg:
        assert want_prompts == {"lowdiv": "low_diversity_group", "collapse": "too_few_candidates"}
        assert sorted(r for r in want_candidates.values() if r != "group_dropped") == \
            ["degenerate_image"] * 5 + ["near_duplicate_candidate"]
    else:  # the low-diversity group now loses its jittered copies as near duplicates, then is too small
        assert want_prompts["lowdiv"] == "too_few_candidates"
        assert [want_candidates[("lowdiv", i)] for i in range(K)] == \
            ["group_dropped"] + ["near_duplicate_candidate"] * 3

    c = counts["candidates"]
    assert c["in"] == K * len(PLANTED) and c["written"] == images_written and c["balanced"]
    reasons = {}
    for r in want_candidates.values():
        reasons[r] = reasons.get(r, 0) + 1
    assert c["dropped"] == reasons
    p = counts["prompts"]
    assert p["written"] == len(PLANTED) - len(want_prompts) and p["balanced"]
    assert counts["pairs"]["in"] == pairs_in and counts["pairs"]["balanced"]
    # details name what decided: the kept twin for a near duplicate, the widest distance for a group
    dup = next(d for d in letters if d["reason"] == "near_duplicate_candidate" and ids[d["record_id"][:16]] == "dup")
    assert dup["detail"].endswith(f"kept candidate {prompt_id_of('dup')}-plant-0")
    assert f"within {distance(PLANTED['dup'][0], PLANTED['dup'][2])} <= 4 bits" in dup["detail"]
    if not filter_cfg:
        widest = max(distance(a, b) for a, b in itertools.combinations(PLANTED["lowdiv"], 2))
        low = next(d for d in letters if d["reason"] == "low_diversity_group")
        assert f"within {widest} <= 8 bits" in low["detail"]
    # the ranked shards hold exactly the kept candidates
    ranked = [json.loads(s["json"]) for s in wds.WebDataset(sorted(glob.glob(f"{out}/ranked/*.tar")),
                                                             shardshuffle=False)]
    written = {(ids[c["candidate_id"][:16]], int(c["candidate_id"].rsplit("-", 1)[1]))
               for m in ranked for c in m["candidates"]}
    planted = {(p, i) for p in PLANTED for i in range(K)}
    assert written == planted - set(want_candidates)


def test_changed_candidate_filter_rewrites_shards_never_reuses_stale_ones(tmp_path):
    """Rerun into a finished build with the near-duplicate filter off: same bytes as a fresh run of that config."""
    first = tmp_path / "first"
    build(job(first))
    before = digests(first)
    changed = {"near_duplicate_candidate_distance": None}
    rerun = build(job(first, **changed))
    fresh = tmp_path / "fresh"
    build(job(fresh, **changed))
    assert digests(first) == digests(fresh) != before
    assert rerun["summary"]["counters"].get("images_generated", 0) == 0  # images reused, shards rewritten
    assert rerun["manifest"]["counts"]["candidates"]["dropped"] == {"degenerate_image": 5, "group_dropped": 5}
    # the shard holding "dup" changed (its near duplicate is back); the other one was provably the same
    assert len(before) == 8 and rerun["summary"]["counters"].get("shards_skipped", 0) == 1


def test_candidate_filter_settings_are_checked():
    base = {"prompts": {}, "generators": [{"id": "g", "model": "m"}], "rewards": [{"name": "sharpness"}]}
    f = build_config_from_dict(base).filter
    assert (f.min_grey_sd, f.max_flat_share, f.low_diversity_distance, f.near_duplicate_candidate_distance) == \
        (2.0, 0.99, 8, 4)
    for key, bad in [("low_diversity_distance", 65), ("near_duplicate_candidate_distance", -1),
                     ("min_grey_sd", 200), ("max_flat_share", 0.2)]:
        with pytest.raises(ValueError, match=f"filter.{key}"):
            build_config_from_dict({**base, "filter": {key: bad}})
