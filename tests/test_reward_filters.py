"""Rewards as filters in the build: ``rewards[].rank: false`` (scored and recorded, not ranked) and
``filter.candidate_thresholds`` (drop a candidate by a score before ranking).

Real builds of planted images (test_candidate_filters' generator) with weight-free rewards. The
expected drops are computed here from the scores a build without thresholds recorded, by the rule
in the README, not with synpref's filter code.
"""
import glob
import json

import pytest
import webdataset as wds

from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
from planted_candidates import K, dead_letters, job_dict  # registers the test_planted generator

PROMPTS = ["normal", "dup", "flat mark"]  # distinct images, a near duplicate, a flat one
RANKING = [{"name": "sharpness"}, {"name": "colourfulness"}, {"name": "near_blank"}]
# the image-fact filters off, so that every candidate's scores are in the reference build's shards
OTHERS_OFF = {"min_grey_sd": 0, "max_flat_share": None, "low_diversity_distance": None,
              "near_duplicate_candidate_distance": None}


def job(out, staging, rewards, **filter_cfg):
    data = job_dict(out, PROMPTS, **OTHERS_OFF, **filter_cfg)
    data["rewards"] = rewards
    data["ranking"] = {"aggregator": "reliability_weighted"}  # dataset statistics over the rewards
    data["output"]["staging_dir"] = str(staging)  # one shared cache of the planted images
    return build_config_from_dict(data)


def ranked(out) -> list[dict]:
    return [json.loads(s["json"]) for s in wds.WebDataset(sorted(glob.glob(f"{out}/ranked/*.tar")),
                                                           shardshuffle=False)]


def labels(out) -> dict[str, tuple]:
    return {c["candidate_id"]: (c["rank"], c["phi"]) for m in ranked(out) for c in m["candidates"]}


@pytest.fixture(scope="module")
def unfiltered(tmp_path_factory):
    """Ranking rewards + brisque as a filter-only reward, no thresholds; and the same without brisque."""
    root = tmp_path_factory.mktemp("reward_filters")
    with_filter_only, without = root / "with", root / "without"
    r_with = build(job(with_filter_only, root / "staging", RANKING + [{"name": "brisque", "rank": False}]))
    r_without = build(job(without, root / "staging", RANKING))
    return root, with_filter_only, without, r_with, r_without


def test_a_filter_only_reward_is_recorded_but_changes_no_label(unfiltered):
    _, with_filter_only, without, r_with, r_without = unfiltered
    assert not r_with["summary"]["problems"] and not r_without["summary"]["problems"]
    got, want = labels(with_filter_only), labels(without)
    assert got == want and len(got) >= 8  # same phi and ranks, candidate by candidate
    m_with, m_without = r_with["manifest"], r_without["manifest"]
    assert m_with["ranking"] == m_without["ranking"]  # estimated weights see only the ranking rewards
    assert [(r["name"], r["rank"]) for r in m_with["rewards"]] == \
        [("sharpness", True), ("colourfulness", True), ("near_blank", True), ("brisque", False)]
    assert m_with["counts"] == m_without["counts"]
    for meta in ranked(with_filter_only):
        assert meta["rewards"] == ["sharpness", "colourfulness", "near_blank"]  # what the labels are made of
        for c in meta["candidates"]:
            assert set(c["scores"]) == {"sharpness", "colourfulness", "near_blank", "brisque"}
    without_scores = {c["candidate_id"]: c["scores"] for m in ranked(without) for c in m["candidates"]}
    for m in ranked(with_filter_only):
        for c in m["candidates"]:
            assert {k: v for k, v in c["scores"].items() if k != "brisque"} == without_scores[c["candidate_id"]]
    # the pair agreement is over the ranking rewards only
    pairs = [json.loads(s["json"]) for s in wds.WebDataset(sorted(glob.glob(f"{with_filter_only}/pairs/*.tar")),
                                                            shardshuffle=False)]
    assert pairs and all(p["rewards"] == ["sharpness", "colourfulness", "near_blank"] for p in pairs)


def test_candidate_thresholds_drop_what_the_recorded_scores_say(unfiltered):
    root, with_filter_only, _, r_with, _ = unfiltered
    scores = {c["candidate_id"]: c["scores"] for m in ranked(with_filter_only) for c in m["candidates"]}
    assert len(scores) == K * len(PROMPTS) and not dead_letters(with_filter_only)
    # bounds from the data: brisque (filter-only) above its upper quartile, colourfulness below its lower one
    brisque = sorted(s["brisque"] for s in scores.values())
    colour = sorted(s["colourfulness"] for s in scores.values())
    b_max, c_min = brisque[(3 * len(brisque)) // 4 - 1], colour[len(colour) // 4]
    thresholds = [{"reward": "brisque", "max": b_max}, {"reward": "colourfulness", "min": c_min}]
    out = root / "thresholds"
    result = build(job(out, root / "staging", RANKING + [{"name": "brisque", "rank": False}],
                       candidate_thresholds=thresholds))
    assert not result["summary"]["problems"]

    # expected, by the rule: the first bound a score breaks, then fewer than min_candidates left
    want, details = {}, {}
    for cid, s in scores.items():
        if s["brisque"] > b_max:
            want[cid], details[cid] = "above_threshold", f"brisque {s['brisque']:.6g} > max {b_max}"
        elif s["colourfulness"] < c_min:
            want[cid], details[cid] = "below_threshold", f"colourfulness {s['colourfulness']:.6g} < min {c_min}"
    by_prompt: dict[str, list[str]] = {}
    for cid in scores:
        by_prompt.setdefault(cid.split("-")[0], []).append(cid)
    too_few = set()
    for pid, cids in by_prompt.items():
        kept = [c for c in cids if c not in want]
        if len(kept) < 2:  # filter.min_candidates
            too_few.add(pid)
            want.update({c: "group_dropped" for c in kept})
    assert "above_threshold" in want.values() and "below_threshold" in want.values() and too_few  # not vacuous

    letters = dead_letters(out)
    got = {d["record_id"]: d["reason"] for d in letters if d["level"] == "candidate"}
    assert got == want, (got, want)
    for d in letters:
        if d["record_id"] in details:
            assert d["detail"] == details[d["record_id"]] and d["stage"] == "filter_candidates"
    assert {d["detail"].split()[1].rstrip(":") for d in letters if d["reason"] == "too_few_candidates"} == too_few
    c = result["manifest"]["counts"]["candidates"]
    assert c["balanced"] and c["in"] == K * len(PROMPTS) and c["written"] == c["in"] - len(want)
    assert c["dropped"] == {r: list(want.values()).count(r) for r in set(want.values())}
    assert all(v["balanced"] for v in result["manifest"]["counts"].values())
    written = {c["candidate_id"] for m in ranked(out) for c in m["candidates"]}
    assert written == set(scores) - set(want)


def test_changed_thresholds_or_rank_flags_rewrite_the_shards(unfiltered, tmp_path):
    """A rerun into a finished build with another rank flag: the same bytes as a fresh run of that config."""
    from test_build_e2e import digests

    root, with_filter_only, *_ = unfiltered
    first = tmp_path / "first"
    rewards = RANKING + [{"name": "brisque", "rank": False}]
    build(job(first, root / "staging", rewards))
    before = digests(first)
    flipped = RANKING[:2] + [{"name": "near_blank", "rank": False}, {"name": "brisque", "rank": False}]
    again = build(job(first, root / "staging", flipped))
    fresh = tmp_path / "fresh"
    build(job(fresh, root / "staging", flipped))
    assert not again["summary"].get("up_to_date") and digests(first) == digests(fresh) != before


@pytest.mark.parametrize("rewards, filter_cfg, ranking, message", [
    ([{"name": "sharpness", "rank": False}], {}, {}, "at least one reward must rank"),
    (RANKING, {"candidate_thresholds": [{"reward": "brisque", "max": 0}]}, {}, "is not in rewards"),
    (RANKING, {"candidate_thresholds": [{"reward": "sharpness"}]}, {}, "give min, max or both"),
    (RANKING, {"candidate_thresholds": [{"reward": "sharpness", "min": 2, "max": 1}]}, {}, "min 2.0 > max 1.0"),
    (RANKING, {"candidate_thresholds": [{"reward": "sharpness", "low": 1}]}, {}, "unknown key"),
    (RANKING + [{"name": "brisque", "rank": False}], {}, {"reward_weights": {"brisque": 2}}, "filter-only"),
    ([{"name": "sharpness", "rank": "maybe"}], {}, {}, "must be true or false"),
])
def test_reward_filter_config_errors(tmp_path, rewards, filter_cfg, ranking, message):
    data = {"prompts": {}, "generators": [{"id": "g", "model": "m"}], "rewards": rewards,
            "filter": {**OTHERS_OFF, **filter_cfg}, "ranking": ranking}
    with pytest.raises(ValueError, match=message):
        build_config_from_dict(data)


def test_thresholds_run_before_the_image_fact_filters():
    """A blank image that an nsfw-style bound also rejects is reported by the bound (it runs first);
    a candidate without the thresholded score (built by hand) passes that check."""
    from synpref.schemas.records import Candidate, Lineage
    from synpref.transforms.candidate_filters import filter_group

    lineage = Lineage(generator_id="g", model="m", revision="main", pipeline_class="x", scheduler="none",
                      num_inference_steps=0, guidance_scale=0.0, height=8, width=8, dtype="float32", seed=0)

    def cand(i, scores, grey_sd):
        return Candidate(f"p-g-{i}", "p", "a prompt", lineage, f"/x/{i}.png", "0" * 64, scores=scores,
                         grey_sd=grey_sd)

    cfg = job_filter({"candidate_thresholds": [{"reward": "nsfw", "max": 0}, {"reward": "sharpness", "min": 1}]})
    verdict = filter_group([cand(0, {"nsfw": 0.25, "sharpness": 0.5}, 0.0), cand(1, {"nsfw": 0.0, "sharpness": 0.5}, 0.0),
                            cand(2, {"sharpness": 3.0}, 30.0), cand(3, {"nsfw": -1.0, "sharpness": 1.0}, 30.0)], cfg)
    assert [(c.candidate_id, reason, detail) for c, reason, detail in verdict.dropped] == [
        ("p-g-0", "above_threshold", "nsfw 0.25 > max 0.0"),  # the first bound broken names the drop
        ("p-g-1", "below_threshold", "sharpness 0.5 < min 1.0"),
    ]
    assert [c.candidate_id for c in verdict.kept] == ["p-g-2", "p-g-3"]  # bounds are inclusive


def job_filter(filter_cfg):
    return build_config_from_dict({"prompts": {}, "generators": [{"id": "g", "model": "m"}],
                                   "rewards": [{"name": "sharpness"}, {"name": "nsfw", "rank": False}],
                                   "filter": filter_cfg}).filter


def test_rank_flag_is_refused_by_the_corpus_filter(tmp_path):
    """``synpref filter`` ranks nothing: a ``rank: false`` there would silently mean nothing."""
    from synpref.schemas.filter_config import filter_config_from_dict

    data = {"input": {"source": [str(tmp_path)]}, "rewards": [{"name": "sharpness"}]}
    assert filter_config_from_dict(data).rewards[0].rank
    with pytest.raises(ValueError, match="applies to the build only"):
        filter_config_from_dict({**data, "rewards": [{"name": "sharpness", "rank": False}]})


def test_inspect_marks_a_filter_only_reward(unfiltered, tmp_path):
    from synpref.cli import main
    from synpref.reporting.inspect_build import inspect_output

    _, with_filter_only, without, _, _ = unfiltered
    text = inspect_output(str(with_filter_only))
    assert "brisque v1 (filter only)" in text and "sharpness v1 (filter only)" not in text
    assert "(filter only)" not in inspect_output(str(without))
    assert main(["inspect", str(with_filter_only), "--html", str(tmp_path / "r.html")]) == 0
    assert "brisque v1 (filter only)" in (tmp_path / "r.html").read_text()
