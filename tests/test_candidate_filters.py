"""Candidate filters before ranking: planted blank/flat images, a near-duplicate pair, a low-diversity group.

A test-only generator (``planted_candidates.py``) returns planted images (by prompt and candidate index), so a real build runs
end to end. Expected drops are derived here from the planted pixels with this file's own numpy
difference hash and statistics, not from synpref's functions.
"""
import glob
import itertools
import json

import pytest
import webdataset as wds

from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
from synpref.transforms.prompts import prompt_id_of
from conftest import digests
from planted_candidates import K, PLANTED, dead_letters, distance, expected, grey_sd, job, largest_colour_share

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
