"""``synpref filter`` output shards: a streaming rule, the same bytes on every runner, each kept sample once.

The corpus: three input tars of generated patterns with a few planted bad samples (an HTML page saved as
.jpg, an empty caption, an exact duplicate across shards), scored with two cheap weight-free rewards.
The expected shards are computed here from the input tars' member order and the index's kept flags
(kept samples of input shard i, in input order, cut into runs of samples_per_shard = filtered-i-j),
not by the code under test. The same job then runs on Beam's in-process DirectRunner, its
multi-processing mode with two workers, and the portable runner (embedded job server, LOOPBACK
workers), and every output file must be byte-identical.
"""
import json
import tarfile
from typing import Sequence

import pyarrow.parquet as pq
import pytest

from synpref.pipelines.filter_corpus import filter_corpus
from synpref.schemas.filter_config import filter_config_from_dict
from synpref.transforms.rewards import Reward, register_reward
from test_filter_corpus import HTML, add, all_files, generated, read_tar, sample

PER_SHARD = 2
RUNNERS = {
    "in_process": [],
    "multi_processing": ["--direct_num_workers=2", "--direct_running_mode=multi_processing"],
    "portable_loopback": ["--runner=PortableRunner", "--job_endpoint=embed", "--environment_type=LOOPBACK"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    images = {i: generated(i) for i in range(9)}
    shards = {  # input shard -> [(key, image, caption)] in member order (keys deliberately not sorted)
        0: [("a3", images[0], b"p0"), ("a1", images[1], b"p1"), ("a2", HTML, b"html"), ("a0", images[2], b"p2"),
            ("a5", images[3], b"p3")],
        1: [("b0", images[4], b"   "), ("b1", images[5], b"p5"), ("b2", images[0], b"a copy of a3")],
        2: [("c0", images[6], b"p6"), ("c1", images[7], b"p7"), ("c2", images[8], b"p8")],
    }
    for i, samples in shards.items():
        with tarfile.open(root / f"{i:05d}.tar", "w") as tar:
            for key, image, caption in samples:
                for name, data in sample(key, image, caption):
                    add(tar, name, data)
    return {"root": root, "order": {i: [k for k, _, _ in s] for i, s in shards.items()}}


def job(source, out, beam_options) -> dict:
    return {"input": {"source": [str(source)], "batch_size": 2},
            "rewards": [{"name": "resolution"}, {"name": "colourfulness"}],
            "filter": {"thresholds": [{"reward": "colourfulness", "min": 0}]},
            "output": {"output_dir": str(out), "samples_per_shard": PER_SHARD}, "beam_options": beam_options}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    out = {}
    for name, options in RUNNERS.items():
        out[name] = tmp_path_factory.mktemp(f"out_{name}")
        result = filter_corpus(filter_config_from_dict(job(corpus["root"], out[name], options)))
        assert result["summary"]["problems"] == [], (name, result["summary"])
    return out


def test_shards_follow_the_input_shard_rule_and_hold_every_kept_sample_once(corpus, runs):
    out = runs["in_process"]
    index = pq.read_table(sorted((out / "index").glob("*.parquet"))).to_pylist()
    kept = {r["key"] for r in index if r["kept"]}
    assert {r["key"]: r["reason"] for r in index if not r["kept"]} == {
        "a2": "not_an_image", "b0": "empty_caption", "b2": "exact_duplicate"}
    expected = {}
    for i, order in corpus["order"].items():
        keep = [k for k in order if k in kept]
        for j in range(0, len(keep), PER_SHARD):
            expected[f"filtered-{i:05d}-{j // PER_SHARD:05d}.tar"] = keep[j:j + PER_SHARD]
    written = {}
    for p in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(p) as t:
            written[p.name] = list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))
    assert written == expected
    assert sorted(k for keys in written.values() for k in keys) == sorted(kept)  # each kept sample exactly once
    manifest = json.loads((out / "manifest.json").read_text())
    assert {s["tar"].split("/")[-1]: s["samples"] for s in manifest["shards"]} == {
        n: len(k) for n, k in expected.items()}
    assert manifest["counts"]["samples"]["written"] == len(kept) and manifest["counts"]["samples"]["balanced"]
    a3 = read_tar(out / "shards" / "filtered-00000-00000.tar")["a3"]
    assert json.loads(a3["json"])["synpref_source"]["member"] == "a3.jpg"


@pytest.mark.parametrize("runner", [r for r in RUNNERS if r != "in_process"])
def test_every_runner_writes_the_same_bytes(runs, runner):
    a, b = all_files(runs["in_process"]), all_files(runs[runner])
    assert sorted(a) == sorted(b) and any(k.startswith("shards/") for k in a)
    assert [k for k in a if a[k] != b[k]] == []  # beam_options are not part of the manifest


@register_reward("test_boom_caption")
class BoomOnCaption(Reward):
    """Raises for a call whose captions include 'boom'; NaN for the caption 'nan'; else the caption's length."""

    def score_batch(self, images, prompts: Sequence[str]):
        if any("boom" in p for p in prompts):
            raise RuntimeError("CUDA out of memory")
        return [float("nan") if p == "nan" else float(len(p)) for p in prompts]


def test_scoring_runs_through_run_inference_and_every_failure_is_a_counted_drop(tmp_path):
    """batch_size chunks of one shard are what a call scores: a reward raising costs exactly its chunk."""
    src = tmp_path / "in"
    src.mkdir()
    captions = [b"p0", b"p1", b"p2", b"boom", b"p4", b"nan", b"p6"]
    with tarfile.open(src / "00000.tar", "w") as tar:
        for i, caption in enumerate(captions):
            for name, data in sample(f"k{i}", generated(i), caption):
                add(tar, name, data)
    cfg = job(src, tmp_path / "out", [])
    cfg["rewards"] = [{"name": "resolution"}, {"name": "test_boom_caption"}]
    cfg["filter"] = {}
    result = filter_corpus(filter_config_from_dict(cfg))
    c = result["manifest"]["counts"]["samples"]
    # batch_size 2: chunks (k0 k1) (k2 k3) (k4 k5) (k6); the chunk holding "boom" fails as a whole
    assert c["in"] == 7 and c["balanced"] and c["dropped"] == {"scoring_error": 2, "nan_score": 1}
    index = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "index" / "samples-00000.parquet").to_pylist()}
    assert {k for k, r in index.items() if r["reason"] == "scoring_error"} == {"k2", "k3"}
    assert index["k2"]["stage"] == "score:test_boom_caption" and "CUDA out of memory" in index["k2"]["detail"]
    assert index["k5"]["reason"] == "nan_score" and index["k4"]["kept"]
    assert index["k0"]["score_test_boom_caption"] == 2.0
    assert any("scoring errors" in p for p in result["summary"]["problems"])


def test_the_scoring_step_carries_the_rewards_accelerator_hint(corpus, tmp_path):
    import apache_beam as beam

    from synpref.pipelines.filter_corpus import FilterCorpus
    from synpref.runs.manifests import filter_header as manifest_header
    from synpref.transforms.corpus_sources import CorpusInput

    cfg = job(corpus["root"], tmp_path / "out", [])
    cfg["rewards"][0]["accelerator"] = "type:nvidia-l4;count:1;install-nvidia-driver"
    cfg = filter_config_from_dict(cfg)
    shards = CorpusInput().list_units([str(corpus["root"])])
    p = beam.Pipeline()
    _ = p | FilterCorpus(cfg, shards, manifest_header(cfg, shards))
    proto = p.to_runner_api()
    hinted = {t.unique_name for t in proto.components.transforms.values()
              if t.environment_id and b"nvidia-l4" in b"".join(
                  proto.components.environments[t.environment_id].resource_hints.values())}
    assert any("ScoreShards/Score" in name for name in hinted), hinted
    assert not any("ReadShards" in name or "Write" in name for name in hinted)  # only the model step


def test_model_copies_shared_across_processes_give_the_same_bytes(corpus, runs, tmp_path):
    cfg = job(corpus["root"], tmp_path / "out", [])
    cfg["rewards"] = [dict(r, model_copies=1) for r in cfg["rewards"]]
    result = filter_corpus(filter_config_from_dict(cfg))
    assert result["summary"]["problems"] == []
    a, b = all_files(runs["in_process"]), all_files(tmp_path / "out")
    assert sorted(a) == sorted(b) and [k for k in a if k != "manifest.json" and a[k] != b[k]] == []
