"""Pairwise-layout pair selection, shard image encodings and within-group filters."""
import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from synpref.schemas.config import FilterConfig, build_config_from_dict
from synpref.schemas.records import Lineage, PreferencePair, PromptRecord, RankedCandidate, RankedGroup
from synpref.transforms.filtering import FilterPairs

LINEAGE = Lineage("g", "m", "main", "P", "S", 2, 5.0, 64, 64, "float32", 0)


def hand_group(n=4, tied=()):
    """Candidates c1..cn at ranks 1..n (phi falling), every pair winner-first, all rewards agreeing
    except the pairs in ``tied`` (equal phi: the noisy-pair filter drops them as tied_phi)."""
    cands = tuple(RankedCandidate(f"c{r}", f"mem://c{r}.png", "0" * 64, r, 1.0 - r / 10, {"r0": -r}, LINEAGE)
                  for r in range(1, n + 1))
    pairs = tuple(
        PreferencePair("p", w.candidate_id, l.candidate_id, w.phi, w.phi if (w.rank, l.rank) in tied else l.phi,
                       1.0, 1, 1)
        for i, w in enumerate(cands) for l in cands[i + 1:])
    return RankedGroup(PromptRecord("p", "a cube"), ("r0",), "syn_pic", cands, pairs)


@pytest.mark.parametrize("selection,k,tied,want_kept,want_reasons", [
    ("all", 1, (), ["c1__c2", "c1__c3", "c1__c4", "c2__c3", "c2__c4", "c3__c4"], {}),
    ("best_worst", 1, (), ["c1__c4"], {"not_selected": 5}),
    # the best/worst pair was itself dropped by the filter: nothing left, and it keeps its own reason
    ("best_worst", 1, ((1, 4),), [], {"tied_phi": 1, "not_selected": 5}),
    ("top_bottom", 1, (), ["c1__c4"], {"not_selected": 5}),
    ("top_bottom", 2, (), ["c1__c3", "c1__c4", "c2__c3", "c2__c4"], {"not_selected": 2}),
    ("top_bottom", 2, ((2, 3),), ["c1__c3", "c1__c4", "c2__c4"], {"tied_phi": 1, "not_selected": 2}),
    ("top_bottom", 4, (), ["c1__c2", "c1__c3", "c1__c4", "c2__c3", "c2__c4", "c3__c4"], {}),
])
def test_pair_selection_keeps_the_chosen_pairs_and_accounts_for_the_rest(selection, k, tied, want_kept,
                                                                        want_reasons):
    group = hand_group(4, tied)
    cfg = FilterConfig(pair_selection=selection, top_bottom_k=k)
    with TestPipeline() as p:
        out = p | beam.Create([group]) | FilterPairs(cfg)
        assert_that(out["groups"] | "K" >> beam.FlatMap(lambda g: [q.key for q in g.pairs]),
                    equal_to(want_kept), label="kept")
        assert_that(out["dropped"] | "D" >> beam.Map(lambda d: (d.level, d.reason)),
                    equal_to([("pair", r) for r, c in want_reasons.items() for _ in range(c)]), label="drops")
        # the ledger balances: every pair is kept or dropped exactly once
        everything = ((out["groups"] | "KK" >> beam.FlatMap(lambda g: [q.key for q in g.pairs])),
                      (out["dropped"] | "DK" >> beam.Map(lambda d: d.record_id))) | beam.Flatten()
        assert_that(everything, equal_to([q.key for q in group.pairs]), label="ledger")


def test_pair_selection_config_is_checked():
    base = {"prompts": {}, "generators": [{"id": "g", "model": "m"}], "rewards": [{"name": "sharpness"}]}
    build_config_from_dict(base)
    cfg = build_config_from_dict({**base, "filter": {"pair_selection": "top_bottom", "top_bottom_k": 2}})
    assert (cfg.filter.pair_selection, cfg.filter.top_bottom_k) == ("top_bottom", 2)
    with pytest.raises(ValueError, match="pair_selection"):
        build_config_from_dict({**base, "filter": {"pair_selection": "best"}})
    with pytest.raises(ValueError, match="top_bottom_k"):
        build_config_from_dict({**base, "filter": {"top_bottom_k": 0}})


# ---- image encoding of the shards -------------------------------------------------------------

def test_encodings_are_deterministic_and_decode():
    import io

    import numpy as np
    from PIL import Image

    from synpref.transforms.staging import encode_image

    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 48, 3), dtype=np.uint8)
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        data = encode_image(pixels, fmt, 90)
        assert data == encode_image(pixels.copy(), fmt, 90)
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.size) == (pil, (48, 32))
    assert encode_image(pixels, "jpeg", 50) != encode_image(pixels, "jpeg", 90)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(pixels, "webp")))), pixels)  # lossless


def test_staging_key_includes_the_encoding(demo_models):
    from synpref.schemas.config import GeneratorConfig
    from synpref.transforms.staging import encoding_tag, generator_fingerprint

    g = GeneratorConfig(id="a", model=demo_models["tiny-sd-a"])
    fps = {generator_fingerprint(g, encoding_tag(f, q)) for f, q in
           (("png", 95), ("png", 50), ("jpeg", 95), ("jpeg", 80), ("webp", 95))}
    assert len(fps) == 4  # png ignores the quality; every other change is a new key
    assert generator_fingerprint(g) == generator_fingerprint(g, "png")  # png staging from before stays valid


def _tar_members(out):
    import glob
    import tarfile

    members = {}
    for layout in ("ranked", "pairs"):
        for path in sorted(glob.glob(f"{out}/{layout}/*.tar")):
            with tarfile.open(path) as tar:
                for m in tar.getmembers():
                    members[f"{layout}/{m.name}"] = tar.extractfile(m).read()
    return members


def test_jpeg_build_writes_jpg_members_that_decode_and_reruns_are_byte_identical(demo_models, tmp_path):
    import glob
    import hashlib
    import io
    import json

    from PIL import Image

    from conftest import tiny_build_config
    from synpref.pipelines.build_preferences import build

    def run(out):
        cfg = tiny_build_config(demo_models, out, output={"output_dir": str(out), "samples_per_shard": 4,
                                                          "image_format": "jpeg", "jpeg_quality": 90})
        return build(build_config_from_dict(cfg))

    run(tmp_path / "a")
    run(tmp_path / "b")
    members = _tar_members(tmp_path / "a")
    images = {n: b for n, b in members.items() if not n.endswith(".json")}
    assert images and all(n.endswith(".jpg") for n in images), sorted(images)[:5]
    assert any(n.startswith("ranked/") and n.endswith(".img0.jpg") for n in images)
    assert any(n.startswith("pairs/") and n.endswith(".win.jpg") for n in images)
    for data in images.values():
        img = Image.open(io.BytesIO(data))
        assert (img.format, img.size) == ("JPEG", (64, 64))
    for name, data in members.items():
        if name.endswith(".json"):
            meta = json.loads(data)
            names = ([c["image"] for c in meta["candidates"]] if "candidates" in meta
                     else [meta["winner"]["image"], meta["loser"]["image"]])
            assert all(n.endswith(".jpg") for n in names)
    # identical bytes on a second run, tars and indexes alike
    def digests(out):
        files = sorted(glob.glob(f"{out}/ranked/*") + glob.glob(f"{out}/pairs/*"))
        return {f.split(str(out))[1]: hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}
    assert digests(tmp_path / "a") == digests(tmp_path / "b") and digests(tmp_path / "a")
    # the HF features follow the manifest's encoding
    from synpref.schemas.hf_features import features_from_manifest

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert "img0.jpg" in features_from_manifest(manifest, "ranked")
    assert "win.jpg" in features_from_manifest(manifest, "pairs")


# ---- within-group filters ----------------------------------------------------------------------

def test_dhash_is_stable_under_small_changes_and_tells_images_apart():
    import numpy as np
    from PIL import Image

    from synpref.transforms.perceptual_hash import dhash, hamming

    rng = np.random.default_rng(1)
    base = (np.linspace(0, 255, 64)[None, :, None] * np.ones((64, 1, 3))).astype(np.uint8)
    base[:32] = 255 - base[:32]
    noisy = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 256, base.shape, dtype=np.uint8)
    h = dhash(Image.fromarray(base))
    assert 0 <= h < 2 ** 64 and dhash(Image.fromarray(base)) == h
    assert hamming(h, dhash(Image.fromarray(noisy))) <= 4
    assert hamming(h, dhash(Image.fromarray(other))) > 12


def test_near_duplicate_pairs_are_dropped_before_selection(tmp_path):
    import dataclasses

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    images = {"c1": base, "c2": np.clip(base.astype(int) + 1, 0, 255).astype(np.uint8),
              "c3": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
              "c4": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}
    for cid, px in images.items():
        Image.fromarray(px).save(tmp_path / f"{cid}.png")
    group = hand_group(4)
    group = dataclasses.replace(group, candidates=tuple(
        dataclasses.replace(c, image_uri=str(tmp_path / f"{c.candidate_id}.png")) for c in group.candidates))
    with TestPipeline() as p:
        out = p | beam.Create([group]) | FilterPairs(FilterConfig(near_duplicate_distance=4))
        assert_that(out["groups"] | "K" >> beam.FlatMap(lambda g: [q.key for q in g.pairs]),
                    equal_to(["c1__c3", "c1__c4", "c2__c3", "c2__c4", "c3__c4"]), label="kept")
        assert_that(out["dropped"] | "D" >> beam.Map(lambda d: (d.reason, d.record_id)),
                    equal_to([("near_duplicate_pair", "c1__c2")]), label="drops")
    # with selection on top, a near-duplicate best/worst pair keeps its own reason
    group2 = dataclasses.replace(group, candidates=tuple(
        dataclasses.replace(c, image_uri=str(tmp_path / ("c1.png" if c.candidate_id == "c4" else f"{c.candidate_id}.png")))
        for c in group.candidates))
    with TestPipeline() as p:
        out = p | beam.Create([group2]) | FilterPairs(FilterConfig(near_duplicate_distance=0,
                                                                   pair_selection="best_worst"))
        assert_that(out["groups"] | "K" >> beam.FlatMap(lambda g: [q.key for q in g.pairs]), equal_to([]), label="kept")
        assert_that(out["dropped"] | "D" >> beam.Map(lambda d: d.reason),
                    equal_to(["near_duplicate_pair"] * 3 + ["not_selected"] * 3), label="drops")


def test_near_duplicate_distance_is_checked():
    base = {"prompts": {}, "generators": [{"id": "g", "model": "m"}], "rewards": [{"name": "sharpness"}]}
    assert build_config_from_dict(base).filter.near_duplicate_distance is None
    assert build_config_from_dict({**base, "filter": {"near_duplicate_distance": 6}}).filter.near_duplicate_distance == 6
    with pytest.raises(ValueError, match="near_duplicate_distance"):
        build_config_from_dict({**base, "filter": {"near_duplicate_distance": 65}})


def test_build_with_selection_and_near_duplicates_balances_its_pair_ledger(demo_models, tmp_path):
    import json

    from conftest import tiny_build_config
    from synpref.pipelines.build_preferences import build

    out = tmp_path / "sel"
    cfg = tiny_build_config(demo_models, out, filter={"pair_selection": "top_bottom", "top_bottom_k": 2,
                                                      "near_duplicate_distance": 0})
    build(build_config_from_dict(cfg))
    pairs = json.loads((out / "manifest.json").read_text())["counts"]["pairs"]
    assert pairs["balanced"], pairs
    assert pairs["dropped"].get("not_selected", 0) > 0, pairs
    assert pairs["written"] <= 4 * 6  # top 2 x bottom 2 of 4 candidates, 6 prompts


def test_near_duplicate_pairs_use_the_hash_the_scoring_step_stored():
    """The candidates carry their difference hash from scoring: no staged image is decoded again (these
    URIs do not exist), and the planted hashes decide: c1/c2 differ in 2 bits, every other pair in >= 30."""
    import dataclasses

    hashes = {"c1": "0f0f0f0f0f0f0f0f", "c2": "0f0f0f0f0f0f0f0c", "c3": "f0f0f0f0f0f0f0f0", "c4": "00ff00ff00ff00ff"}
    assert bin(int(hashes["c1"], 16) ^ int(hashes["c2"], 16)).count("1") == 2
    group = hand_group(4)
    group = dataclasses.replace(group, candidates=tuple(
        dataclasses.replace(c, image_uri=f"/nonexistent/{c.candidate_id}.png", dhash=hashes[c.candidate_id])
        for c in group.candidates))
    with TestPipeline() as p:
        out = p | beam.Create([group]) | FilterPairs(FilterConfig(near_duplicate_distance=2))
        assert_that(out["dropped"] | "D" >> beam.Map(lambda d: (d.reason, d.record_id)),
                    equal_to([("near_duplicate_pair", "c1__c2")]), label="drops")
