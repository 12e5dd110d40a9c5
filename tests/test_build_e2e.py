"""The build pipeline end to end on tiny offline models: shards, manifest, accounting, determinism, resume."""
import glob
import hashlib
import io
import json
import os
import shutil
import unicodedata

import datasets
import pytest
import webdataset as wds
from PIL import Image

from conftest import digests, tiny_build_config
from synpref.pipelines.build_preferences import build
from synpref.schemas.config import build_config_from_dict
from synpref.transforms.prompts import read_raw_prompts


def run_build(models, out, pipeline_args=None, **overrides):
    return build(build_config_from_dict(tiny_build_config(models, out, **overrides)), pipeline_args)


@pytest.fixture(scope="module")
def first_build(demo_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    result = run_build(demo_models, out, output={"output_dir": str(out), "samples_per_shard": 4, "staging": "keep"})
    return out, result


def test_shards_read_back_and_match_the_manifest(first_build):
    out, result = first_build
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    ranked = sorted(glob.glob(f"{out}/ranked/*.tar"))
    pairs = sorted(glob.glob(f"{out}/pairs/*.tar"))
    assert len(ranked) == len(pairs) == len(manifest["shards"]) == 2  # 6 prompts, 4 per shard

    samples = list(wds.WebDataset(ranked, shardshuffle=False))
    assert len(samples) == counts["prompts"]["written"] == 6
    assert sum(len(json.loads(s["json"])["candidates"]) for s in samples) == counts["candidates"]["written"] == 24
    hf = datasets.load_dataset("webdataset", data_files={"train": ranked}, split="train")
    assert hf.num_rows == counts["prompts"]["written"]
    assert isinstance(hf[0]["img0.png"], Image.Image) and hf[0]["img0.png"].size == (64, 64)
    hf_pairs = datasets.load_dataset("webdataset", data_files={"train": pairs}, split="train")
    assert hf_pairs.num_rows == counts["pairs"]["written"] > 0
    for level in ("prompts", "candidates", "pairs"):
        assert counts[level]["balanced"], level
    assert result["summary"]["counts"] == counts


def test_ranked_samples_carry_labels_scores_and_lineage(first_build):
    out, _ = first_build
    for sample in wds.WebDataset(sorted(glob.glob(f"{out}/ranked/*.tar")), shardshuffle=False):
        meta = json.loads(sample["json"])
        cands = meta["candidates"]
        assert [c["rank"] for c in cands] == list(range(1, len(cands) + 1))
        assert [c["image"] for c in cands] == [f"img{i}.png" for i in range(len(cands))]
        phi = [c["phi"] for c in cands]
        assert phi == sorted(phi, reverse=True)
        # phi_i = strict wins of i over every other candidate on every reward / (n_rewards * (k - 1)),
        # counted here with plain loops (arXiv 2410.18013 Alg. 1; docs/math.md s.1)
        k, rewards = len(cands), meta["rewards"]
        wins = [sum(c["scores"][r] > o["scores"][r] for o in cands if o is not c for r in rewards) for c in cands]
        assert phi == pytest.approx([w / (len(rewards) * (k - 1)) for w in wins])
        lineage = cands[0]["lineage"]
        assert {"generator_id", "model", "revision", "scheduler", "num_inference_steps", "guidance_scale",
                "seed"} <= set(lineage)
        assert {c["lineage"]["scheduler"] for c in cands} == {"PNDMScheduler", "EulerDiscreteScheduler"}
        for i in range(len(cands)):
            assert Image.open(io.BytesIO(sample[f"img{i}.png"])).size == (64, 64)


def test_pairs_are_oriented_and_filtered(first_build):
    out, _ = first_build
    for sample in wds.WebDataset(sorted(glob.glob(f"{out}/pairs/*.tar")), shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["winner"]["phi"] > meta["loser"]["phi"]
        assert meta["agreement"] > 0.5
        assert sample["__key__"] == f"{meta['winner']['candidate_id']}__{meta['loser']['candidate_id']}"


def test_every_input_prompt_is_written_or_dropped_with_a_reason(first_build):
    out, _ = first_build
    written = {json.loads(s["json"])["prompt_id"]
               for s in wds.WebDataset(sorted(glob.glob(f"{out}/ranked/*.tar")), shardshuffle=False)}
    drops = [json.loads(line) for f in glob.glob(f"{out}/dead_letter/*.jsonl") for line in open(f)]
    dropped = {d["record_id"]: d["reason"] for d in drops if d["level"] == "prompt"}
    from synpref.schemas.config import PromptsConfig

    for raw in read_raw_prompts(PromptsConfig()):
        cleaned = " ".join(unicodedata.normalize("NFC", raw.text).split())  # the README's prompt id rule
        in_output = hashlib.sha256(cleaned.encode("utf-8")).hexdigest()[:16] in written
        assert in_output != (raw.record_id in dropped), raw.record_id
    assert set(dropped.values()) == {"not_sampled"}


def test_same_seed_gives_byte_identical_shards(first_build, demo_models, tmp_path):
    out, _ = first_build
    run_build(demo_models, tmp_path / "again")
    assert digests(tmp_path / "again") == digests(out)
    other = tmp_path / "other_seed"
    run_build(demo_models, other, seed=1)
    assert digests(other) != digests(out)


def test_rerun_resumes_from_staged_images_and_finished_shards(first_build, demo_models, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(first_build[0], out)
    before = digests(out)
    # A crash left a half-written tar and shard 1 unfinished; one staged image is corrupt.
    (out / "ranked" / "ranked-00001.tar.tmp").write_bytes(b"half a tar")
    os.remove(out / "_stats" / "shard-00001.json")
    os.remove(out / "ranked" / "ranked-00001.tar")
    staged = sorted(glob.glob(f"{out}/_staging/*/*.png"))
    assert len(staged) == 24
    open(staged[0], "wb").write(b"\x89PNG garbage")
    result = run_build(demo_models, out)
    assert digests(out) == before  # no duplicates, no leftovers, same bytes
    assert result["manifest"]["counts"] == json.loads((first_build[0] / "manifest.json").read_text())["counts"]
    counters = result["summary"]["counters"]
    assert first_build[1]["summary"]["counters"]["images_generated"] == 24
    assert counters["images_generated"] == 2  # only the request with the corrupt image, not all 24
    assert counters["images_reused"] == 22
    assert counters["shards_skipped"] == 1
    assert not glob.glob(f"{out}/_staging")  # a clean run removes the default staging folder
    assert not glob.glob(f"{out}/**/*.tmp", recursive=True) and not glob.glob(f"{out}/dead_letter/beam-temp*")


def test_portable_runner_gives_the_same_shards(first_build, demo_models, tmp_path):
    """The portable path Flink, Spark and Dataflow use, with an embedded job server."""
    out = tmp_path / "portable"
    run_build(demo_models, out, pipeline_args=["--runner=PortableRunner", "--job_endpoint=embed",
                                                "--environment_type=LOOPBACK"])
    assert digests(out) == digests(first_build[0])
