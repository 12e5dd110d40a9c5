"""Scaling features of the trainer on a tiny SD1.x model (offline, CPU): two processes, gradient
checkpointing, 8-bit Adam / mixed precision checks, encoder caches, tracker logging."""
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import synpref.training.train as train_mod
from synpref.training.config import TrainConfig
from synpref.training.data import RankedShards, collate_ranked
from synpref.training.train import add_lora, compute_step, load_models, train
from trainer_fixtures import model_dir, one_thread, write_ranked_shard  # noqa: F401 (fixtures)


# two shards, three prompts each: with two processes each one reads one shard
SHARDS = [[(f"s{s}p{j}", f"prompt {s} {j}", [1.0, 0.5, 0.0] if j != 1 else [0.8, 0.2]) for j in range(3)]
          for s in range(2)]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked")
    rng = np.random.default_rng(0)
    for s, samples in enumerate(SHARDS):
        write_ranked_shard(out / f"ranked-{s:05d}.tar", samples, rng)
    return out


def config(model_dir, shards, out, **kw):
    values = dict(pretrained_model=str(model_dir), shards=[str(s) for s in shards], output_dir=str(out),
                  resolution=32, batch_size=2, max_steps=2, learning_rate=1e-3, seed=1)
    return TrainConfig(**{**values, **kw})


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- 1. two processes (torchrun + gloo; accelerate picks MULTI_CPU from ACCELERATE_USE_CPU)
def launch_two(model_dir, shard_dir, out, cfg, extra: str = "") -> dict:
    """Train with two processes on CPU; return the summary the main process wrote."""
    cfg.write_text(f"pretrained_model: {model_dir}\nshards: [{shard_dir}]\noutput_dir: {out}\nresolution: 32\n"
                   "batch_size: 1\nmax_steps: 2\nlearning_rate: 1.0e-3\ntorch_threads: 1\n" + extra)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "synpref.training.train", "--config", str(cfg)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-12000:]
    assert proc.stderr.count("saved LoRA to") == 1  # the main process alone saves
    return json.loads((out / "train_summary.json").read_text())


def test_two_processes_train_on_their_own_shares(model_dir, shard_dir, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process with accelerate 1.x (multi-CPU
    # goes through mpirun there); torchrun with ACCELERATE_USE_CPU=true gives accelerate MULTI_CPU on gloo.
    out = tmp_path / "out"
    summary = launch_two(model_dir, shard_dir, out, tmp_path / "train.yaml")
    assert summary["steps"] == 2 and all(math.isfinite(x) for x in summary["losses"])
    assert len(read_log(out / "train_log.csv")) == 2  # one row per step, not one per process
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    # each process decoded only its shard: 2 samples each, disjoint, from shard <rank>
    shares = summary["data_shares"]
    assert [s["process"] for s in shares] == [0, 1]
    assert [s["decoded"] for s in shares] == [2, 2]
    for s in shares:
        assert s["first_prompt_ids"] == [f"s{s['process']}p0", f"s{s['process']}p1"]
    # gradients were all-reduced: both processes hold the same, trained, LoRA weights
    a, b = summary["lora_checksums"]
    assert a == b
    single = train(config(model_dir, [shard_dir], tmp_path / "single", batch_size=1, max_steps=2))
    assert single["data_shares"] == [{"process": 0, "decoded": 2, "prompts": 2, "first_prompt_ids": ["s0p0", "s0p1"],
                                      "decoded_this_launch": 2}]


@pytest.mark.slow  # two 6-step two-process launches: ~35 s on 2 shared cores
def test_two_processes_resume_to_the_weights_of_a_straight_run(model_dir, shard_dir, tmp_path):
    # 6 steps (each process: 3 prompts of its shard, batch 1: two epochs, shuffled), checkpoint at step 3;
    # then a fresh launch resumes from that checkpoint in another output_dir and must end on the same weights
    from safetensors.torch import load_file

    extra = "max_steps: 6\ncheckpointing_steps: 3\nshuffle: true\nlr_scheduler: cosine\nseed: 4\n"
    straight = launch_two(model_dir, shard_dir, tmp_path / "straight", tmp_path / "a.yaml", extra)
    ckpt = tmp_path / "straight" / "checkpoint-3"
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoint-3")
    resumed = launch_two(model_dir, shard_dir, tmp_path / "resumed", tmp_path / "b.yaml",
                         extra + "resume_from_checkpoint: latest\n")
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["losses"] == straight["losses"]
    a, b = load_file(straight["lora_path"]), load_file(resumed["lora_path"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["lora_checksums"] == straight["lora_checksums"]
    # each process jumped to its own position: it decoded only the 3 samples after its checkpoint
    at_ckpt = [json.loads((ckpt / f"data_{r}.json").read_text())["decoded"] for r in range(2)]
    assert at_ckpt == [3, 3] and [s["decoded"] for s in straight["data_shares"]] == [6, 6]
    assert [s["decoded_this_launch"] for s in resumed["data_shares"]] == [3, 3]
    assert [s["first_prompt_ids"] for s in resumed["data_shares"]] == [s["first_prompt_ids"] for s in straight["data_shares"]]


def test_a_multi_process_launch_that_accelerate_does_not_see_is_refused(model_dir, shard_dir, tmp_path, monkeypatch):
    # torchrun on CPU without ACCELERATE_USE_CPU: every process would train alone on all the data
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=true"):
        train(config(model_dir, [shard_dir], tmp_path))


# ---- 2. gradient checkpointing, 8-bit Adam, mixed precision
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_dir, shard_dir, tmp_path):
    cfg = config(model_dir, [shard_dir], tmp_path)
    models = load_models(cfg)
    params = add_lora(models.unet, cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in params:  # LoRA B starts at 0; give every LoRA weight a gradient
            p.copy_(0.1 * torch.randn_like(p))
    models.unet.train()
    batch = collate_ranked(list(RankedShards([str(shard_dir / "ranked-00000.tar")], 32))[:2])

    def loss_and_grads():
        for p in params:
            p.grad = None
        out = compute_step(models, batch, cfg, torch.Generator().manual_seed(0))
        out.loss.backward()
        return out.loss.item(), [p.grad.clone() for p in params]

    plain_loss, plain_grads = loss_and_grads()
    calls = []

    def counting_checkpoint(fn, *args):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)

    models.unet.enable_gradient_checkpointing(counting_checkpoint)
    ckpt_loss, ckpt_grads = loss_and_grads()
    assert calls  # the denoiser did recompute
    assert abs(ckpt_loss - plain_loss) < 1e-6
    for g0, g1 in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)

    # and through train(): same losses with and without
    runs = [train(config(model_dir, [shard_dir], tmp_path / str(gc), gradient_checkpointing=gc))["losses"]
            for gc in (False, True)]
    assert len(runs[0]) == 2 and all(abs(x - y) < 1e-6 for x, y in zip(*runs))


def test_optimizer_and_precision_settings_are_checked_at_config_time(model_dir, shard_dir, tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ValueError, match="pip install bitsandbytes") as err:
            config(model_dir, [shard_dir], tmp_path, use_8bit_adam=True)
        assert "\n" not in str(err.value)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16 needs a CUDA GPU") as err:
            config(model_dir, [shard_dir], tmp_path, mixed_precision="fp16")
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="report_to: 'wandb' is not one of"):
        config(model_dir, [shard_dir], tmp_path, report_to="wandb")
    # bf16 runs on CPU (frozen weights in bf16, autocast); the LoRA stays fp32. accelerate keeps one
    # process-wide state, so reset it around a run with another precision (a launched run trains once).
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    try:
        summary = train(config(model_dir, [shard_dir], tmp_path / "bf16", mixed_precision="bf16", max_steps=1))
    finally:
        AcceleratorState._reset_state()
    assert summary["steps"] == 1 and all(math.isfinite(x) for x in summary["losses"])


# ---- 3. encoder caches
def test_cached_latents_and_prompts_give_the_same_losses_and_encode_once(model_dir, shard_dir, tmp_path, monkeypatch):
    real_load, counts = train_mod.load_models, {}

    def counting_load(*args, **kwargs):
        models = real_load(*args, **kwargs)
        encode, text_forward = models.vae.encode, models.text_encoder.forward

        def vae_encode(x, *a, **k):
            counts["vae"] = counts.get("vae", 0) + len(x)
            return encode(x, *a, **k)

        def text(ids, *a, **k):
            counts["text"] = counts.get("text", 0) + len(ids)
            return text_forward(ids, *a, **k)

        models.vae.encode, models.text_encoder.forward = vae_encode, text
        return models

    monkeypatch.setattr(train_mod, "load_models", counting_load)
    shard = shard_dir / "ranked-00000.tar"  # 3 prompts, 8 images; batch 2, 4 steps = 2 epochs
    runs = {}
    for cached in (False, True):
        counts.clear()
        summary = train(config(model_dir, [shard], tmp_path / str(cached), max_steps=4,
                               cache_latents=cached, cache_text_embeddings=cached))
        runs[cached] = (summary, dict(counts))
    (plain, plain_counts), (cached, cached_counts) = runs[False], runs[True]
    assert len(plain["losses"]) == 4
    assert all(abs(x - y) < 1e-6 for x, y in zip(plain["losses"], cached["losses"]))
    for m0, m1 in zip(plain["metrics"], cached["metrics"]):
        assert m0 == pytest.approx(m1, abs=1e-6)
    assert plain_counts == {"vae": 16, "text": 6}  # every epoch re-encodes
    assert cached_counts == {"vae": 8, "text": 3}  # once per image / prompt
    assert cached["cache"]["vae_images_encoded"] == 8 and cached["cache"]["prompts_encoded"] == 3
    # 8 latent distributions of 2 x 4 x 4 x 4 fp32 + 3 prompt embeddings of 77 x 32 fp32
    assert cached["cache"]["bytes"] == 8 * 2 * 4 * 4 * 4 * 4 + 3 * 77 * 32 * 4


# ---- 4. trackers
def test_report_to_logs_the_csv_metrics_through_accelerate_trackers(model_dir, shard_dir, tmp_path, monkeypatch):
    from accelerate.tracking import GeneralTracker

    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ValueError, match="pip install tensorboard") as err:
            config(model_dir, [shard_dir], tmp_path, report_to="tensorboard")
        assert "\n" not in str(err.value)

    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False
        logged, init = [], {}

        def __init__(self):
            super().__init__()

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            Recorder.init.update(values)

        def log(self, values, step=None, **kwargs):
            Recorder.logged.append({"step": step, **values})

    monkeypatch.setattr(TrainConfig, "check_environment", lambda self: None)  # tensorboard need not be installed
    monkeypatch.setattr(train_mod, "_log_with", lambda config: [Recorder()])
    summary = train(config(model_dir, [shard_dir], tmp_path / "tb", max_steps=3, report_to="tensorboard"))
    rows = read_log(summary["log_path"])
    assert len(Recorder.logged) == 3
    for row, logged in zip(rows, Recorder.logged):
        assert {k: float(v) for k, v in row.items()} == pytest.approx({k: float(v) for k, v in logged.items()})
    assert Recorder.init["loss"] == "rankdpo" and Recorder.init["shards"] == str([str(shard_dir)])


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_writes_event_files(model_dir, shard_dir, tmp_path):
    summary = train(config(model_dir, [shard_dir], tmp_path, max_steps=2, report_to="tensorboard"))
    assert summary["steps"] == 2
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_caches_give_the_same_losses_for_sdxl_and_sd3(family, shard_dir, tmp_path_factory, tmp_path):
    # SDXL: pooled embeddings and time ids per prompt, fp32 VAE; SD3: shift factor, flow matching
    from synpref.demo.tiny_families import save_tiny_sd3, save_tiny_sdxl

    root = tmp_path_factory.mktemp(f"{family}-models")
    model = {"sdxl": save_tiny_sdxl, "sd3": save_tiny_sd3}[family](root / family)
    runs = [train(config(model, [shard_dir / "ranked-00000.tar"], tmp_path / str(c), max_steps=4,
                         cache_latents=c, cache_text_embeddings=c)) for c in (False, True)]
    assert len(runs[0]["losses"]) == 4 and all(math.isfinite(x) for x in runs[0]["losses"])
    assert all(abs(x - y) < 1e-6 for x, y in zip(runs[0]["losses"], runs[1]["losses"]))
    assert runs[1]["cache"]["vae_images_encoded"] == 8 and runs[1]["cache"]["prompts_encoded"] == 3


def test_empty_prompts_reach_the_text_encoder(model_dir, shard_dir, tmp_path):
    # proportion_empty_prompts 1: every prompt is "", so the text cache encodes exactly one prompt
    summary = train(config(model_dir, [shard_dir / "ranked-00000.tar"], tmp_path, max_steps=2,
                           cache_text_embeddings=True, proportion_empty_prompts=1.0))
    assert summary["steps"] == 2 and summary["cache"]["prompts_encoded"] == 1
