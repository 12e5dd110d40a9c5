"""``accounting.ledger``: one per-level ledger for every pipeline, levels declared by the pipeline."""
from synpref.transforms.accounting import FILTER_LEVELS
from synpref.schemas.records import Candidate, CorpusRecord, Drop, ImageRecord, Lineage
from synpref.transforms.accounting import BUILD_LEVELS, ledger


def test_declared_levels_balance_and_an_undeclared_drop_level_cannot():
    drops = {"sample:corrupt_image": 2, "sample:below_threshold": 3}
    c = ledger(FILTER_LEVELS, {"samples": 10}, {"samples": 5}, drops)
    assert c == {"samples": {"in": 10, "written": 5, "dropped": {"below_threshold": 3, "corrupt_image": 2},
                             "dropped_total": 5, "balanced": True}}
    c = ledger(FILTER_LEVELS, {"samples": 10}, {"samples": 5}, {**drops, "candidate:nan_score": 1})
    assert c["samples"]["balanced"] and not c["candidate"]["balanced"]  # a drop nobody declared shows up
    build = ledger(BUILD_LEVELS, {"prompts": 3, "candidates": 8, "pairs": 4},
                   {"prompts": 2, "candidates": 8, "pairs": 3}, {"prompt:duplicate": 1, "pair:tied_phi": 1})
    assert list(build) == ["prompts", "candidates", "pairs"] and all(v["balanced"] for v in build.values())


def test_a_candidate_and_a_corpus_sample_are_image_records_with_the_same_drop():
    lineage = Lineage("g", "m", "", "P", "S", 2, 1.0, 8, 8, "float32", 7)
    cand = Candidate("p-g-0", "p", "a red cube", lineage, "mem://x.png", "0" * 64, {"r": 1.0})
    sample = CorpusRecord("000001", 0, "a.tar", "000001.jpg", 512, 100, "1" * 64, "a cat", scores={"r": 2.0})
    assert isinstance(cand, ImageRecord) and isinstance(sample, ImageRecord)
    assert (cand.record_id, cand.text, cand.provenance["seed"]) == ("p-g-0", "a red cube", 7)
    assert (sample.record_id, sample.text, sample.provenance["shard"]) == ("000001", "a cat", "a.tar")
    assert cand.drop("nan_score", "score:r", "x  at 0x7f00\n y") == Drop("candidate", "nan_score", "p-g-0",
                                                                          "score:r", "x y")
    dropped = sample.drop("below_threshold", "filter", "r 2 < 3")
    assert sample.kept and not dropped.kept and dropped.reason == "below_threshold"
    assert dropped.dropped == Drop("sample", "below_threshold", "000001", "filter", "r 2 < 3")
    assert dropped.dropped.to_json() == ('{"detail": "r 2 < 3", "level": "sample", "reason": "below_threshold", '
                                         '"record_id": "000001", "stage": "filter"}')
