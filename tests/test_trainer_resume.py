"""Checkpoints and exact resume: a run interrupted after step 3 of 6 and resumed ends where a straight run ends."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file
from test_trainer_data import decoded  # noqa: F401 (fixture: counts decode_image calls)

import synpref.training.train as train_mod
from synpref.training.config import TrainConfig
from synpref.training.train import config_key, list_checkpoints, resolve_checkpoint, train
from trainer_fixtures import model_dir, one_thread, write_ranked_shard  # noqa: F401 (fixtures)


PROMPTS = [("a1", "a red cube", [1.0, 0.5, 0.0]), ("a2", "two cats", [0.75, 0.25]),
           ("a3", "a green car", [0.9, 0.1]), ("a4", "a lighthouse", [0.6, 0.4, 0.1]), ("a5", "fruit", [1.0, 0.0])]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked")
    rng = np.random.default_rng(0)
    write_ranked_shard(out / "ranked-00000.tar", PROMPTS, rng)
    return out


def config(model_dir, shard_dir, out, **kw):
    # shuffle (epoch-seeded), accumulation and a warmup + cosine LR make every piece of state matter
    values = dict(pretrained_model=str(model_dir), shards=[str(shard_dir)], output_dir=str(out), resolution=32,
                  batch_size=2, max_steps=6, learning_rate=1e-3, shuffle=True, gradient_accumulation_steps=2,
                  lr_scheduler="cosine", lr_warmup_steps=2, checkpointing_steps=3, seed=3)
    return TrainConfig(**{**values, **kw})


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_interrupted_and_resumed_run_equals_a_straight_run(model_dir, shard_dir, tmp_path, monkeypatch):
    straight = train(config(model_dir, shard_dir, tmp_path / "straight"))
    assert [p.name for p in list_checkpoints(tmp_path / "straight")] == ["checkpoint-3", "checkpoint-6"]

    # interrupt: the 7th micro-batch (step 4 with accumulation 2) raises
    real_step, calls = train_mod.compute_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("simulated preemption")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "compute_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(config(model_dir, shard_dir, tmp_path / "resumed"))
    monkeypatch.setattr(train_mod, "compute_step", real_step)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-3"]
    assert len(read_log(tmp_path / "resumed" / "train_log.csv")) == 3

    resumed = train(config(model_dir, shard_dir, tmp_path / "resumed", resume_from_checkpoint="latest"))
    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert resumed["losses"] == straight["losses"] and len(resumed["losses"]) == 6
    a, b = load_file(straight["lora_path"]), load_file(resumed["lora_path"])
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the per-step CSV continues without gaps or duplicates
    log_a, log_b = read_log(straight["log_path"]), read_log(resumed["log_path"])
    assert [r["step"] for r in log_b] == [str(i) for i in range(1, 7)]
    assert log_a == log_b
    assert set(log_a[0]) == {"step", "loss", "implicit_acc", "model_err", "ref_err", "lr"}


def test_checkpoint_refuses_a_changed_config_and_names_paths(model_dir, shard_dir, tmp_path):
    cfg = config(model_dir, shard_dir, tmp_path, max_steps=3, checkpoints_total_limit=1, checkpointing_steps=1)
    train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]  # older ones pruned
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "pytorch_lora_weights.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    with pytest.raises(ValueError, match="different config"):
        train(config(model_dir, shard_dir, tmp_path, beta=100.0, resume_from_checkpoint=str(ckpt)))
    # bookkeeping fields may change; a missing explicit path and an empty 'latest' are handled
    assert config_key(cfg) == config_key(config(model_dir, shard_dir, tmp_path / "x", max_steps=9))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(config(model_dir, shard_dir, tmp_path, resume_from_checkpoint=str(tmp_path / "nope")))
    assert resolve_checkpoint(config(model_dir, shard_dir, tmp_path / "empty", resume_from_checkpoint="latest")) is None


def test_resume_jumps_to_its_data_position_without_decoding_earlier_samples(model_dir, shard_dir, tmp_path, decoded):
    # a sample with a corrupt image; 5 valid prompts, batch 2: every epoch is batches 2, 2, 1, so the
    # step-3 checkpoint sits exactly at the end of epoch 0
    bad = tmp_path / "bad-shard"
    bad.mkdir()
    with wds.TarWriter(str(bad / "ranked-00001.tar"), mtime=0) as sink:
        meta = {"prompt_id": "b1", "prompt": "broken", "candidates": [
            {"candidate_id": f"b1-{i}", "image": f"img{i}.png", "rank": i + 1, "phi": 1.0 - i} for i in range(2)]}
        sink.write({"__key__": "b1", "json": json.dumps(meta).encode(), "img0.png": b"not a png", "img1.png": b"x"})
    decodes = decoded  # every image the reader decodes, in order
    shards = [str(shard_dir / "ranked-00000.tar"), str(bad / "ranked-00001.tar")]
    kw = dict(shards=shards, gradient_accumulation_steps=1, lr_scheduler="constant", lr_warmup_steps=0)
    straight = train(config(model_dir, shard_dir, tmp_path / "straight", **kw))
    straight_decodes = list(decodes)
    ckpt = tmp_path / "straight" / "checkpoint-3"
    at_checkpoint = json.loads((ckpt / "data_0.json").read_text())["decoded"]
    assert 0 < at_checkpoint < straight["data_shares"][0]["decoded"]

    # resume from the straight run's own step-3 checkpoint in a fresh output_dir
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-3")
    decodes.clear()
    resumed = train(config(model_dir, shard_dir, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed["losses"] == straight["losses"]
    a, b = load_file(straight["lora_path"]), load_file(resumed["lora_path"])
    assert all(torch.equal(a[key], b[key]) for key in a)
    # only samples after the checkpoint were decoded: the tail of the straight run's decodes, nothing more
    # (epoch 0: 12 images of the 5 prompts + the bad sample's first image, where decoding stops)
    n_epoch = sum(len(phis) for _, _, phis in PROMPTS) + 1
    assert n_epoch == 13 and decodes == straight_decodes[n_epoch:]
    assert resumed["data_shares"][0]["decoded_this_launch"] == straight["data_shares"][0]["decoded"] - at_checkpoint
    # the run's totals and bad-sample counts carry over from the checkpoint
    assert resumed["skipped"] == straight["skipped"] == {"not_an_image": 2}
    assert [{k: v for k, v in s.items() if k != "decoded_this_launch"} for s in resumed["data_shares"]] == \
        [{k: v for k, v in s.items() if k != "decoded_this_launch"} for s in straight["data_shares"]]
