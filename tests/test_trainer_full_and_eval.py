"""Full fine-tuning (``finetune: full``) and the evaluation hook (``eval_every``) on a tiny SD1.x pipeline."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import synpref.training.train as train_mod
from synpref.schemas.loading import dump_config
from synpref.training.config import TrainConfig
from synpref.training.preflight import preflight_train
from synpref.training.evaluation import load_eval_prompts, read_eval_log
from synpref.training.train import train
from trainer_fixtures import model_dir, one_thread, write_ranked_shard  # noqa: F401 (fixtures)


PROMPTS = [("a1", "a red cube", [1.0, 0.5, 0.0]), ("a2", "two cats", [0.75, 0.25]),
           ("a3", "a green car", [0.9, 0.1]), ("a4", "a lighthouse", [0.6, 0.4, 0.1])]
EVAL_PROMPTS = ["a blue ball", "a small house"]
EVAL_REWARDS = [{"name": "sharpness"}, {"name": "colourfulness"}]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked")
    rng = np.random.default_rng(0)
    write_ranked_shard(out / "ranked-00000.tar", PROMPTS, rng)
    return out


def config(model_dir, shard_dir, out, **kw):
    values = dict(pretrained_model=str(model_dir), shards=[str(shard_dir)], output_dir=str(out), resolution=32,
                  batch_size=2, max_steps=1, learning_rate=1e-3, seed=3)
    return TrainConfig(**{**values, **kw})


def eval_kw(**kw):
    return {**dict(eval_every=2, eval_prompts=EVAL_PROMPTS, eval_rewards=EVAL_REWARDS, eval_steps=2,
                   eval_resolution=32, eval_seed=7), **kw}


def unet_state(path):
    from diffusers import UNet2DConditionModel

    return {k: v.clone() for k, v in UNet2DConditionModel.from_pretrained(str(path)).state_dict().items()}


def generate(model_dir, unet=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), **({"unet": unet} if unet is not None else {}))
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a blue ball", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images[0]


# ---- full fine-tuning
def test_full_finetune_trains_every_weight_keeps_a_frozen_reference_and_saves_a_loadable_unet(
        model_dir, shard_dir, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    initial = unet_state(f"{model_dir}/unet")
    captured = {}
    real = train_mod.make_full_finetune

    def capture(models):
        params = real(models)
        captured["models"] = models
        return params

    monkeypatch.setattr(train_mod, "make_full_finetune", capture)
    # beta 1: at init model and reference agree up to float noise of kernel choice (~1e-7 per image), which
    # the default beta 2500 would lift to ~1e-4 in the loss
    full = train(config(model_dir, shard_dir, tmp_path / "full", finetune="full", beta=1.0))
    lora = train(config(model_dir, shard_dir, tmp_path / "lora", beta=1.0))

    # both policies equal their reference at init: the same step-0 loss (log 2 x pair weights) and errors
    assert full["losses"][0] == pytest.approx(lora["losses"][0], rel=1e-6)
    for run in (full, lora):
        assert run["metrics"][0]["model_err"] == pytest.approx(run["metrics"][0]["ref_err"], rel=1e-6)
    assert full["metrics"][0]["ref_err"] == lora["metrics"][0]["ref_err"]
    assert full["finetune"] == "full" and full["lora_path"] is None
    assert full["denoiser_path"] == str(tmp_path / "full" / "unet")
    assert not (tmp_path / "full" / "pytorch_lora_weights.safetensors").exists()

    # the reference: a frozen copy equal to the initial weights after training
    reference = captured["models"].reference
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    ref_state = reference.state_dict()
    assert ref_state.keys() == initial.keys()
    for key in initial:
        assert torch.equal(ref_state[key], initial[key]), key

    # one step changed (many) weights, not just attention projections; the saved UNet loads in diffusers
    trained = unet_state(tmp_path / "full" / "unet")
    assert trained.keys() == initial.keys()
    changed = [k for k in initial if not torch.equal(trained[k], initial[k])]
    assert len(changed) > len(initial) // 2
    assert any("conv" in k for k in changed) and any("to_q" in k for k in changed)
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "full" / "unet"))
    base_image, tuned_image = generate(model_dir), generate(model_dir, unet)
    assert base_image.shape == tuned_image.shape and np.isfinite(tuned_image).all()
    assert np.abs(base_image - tuned_image).max() > 1e-4


def test_full_finetune_interrupted_and_resumed_equals_a_straight_run(model_dir, shard_dir, tmp_path, monkeypatch):
    kw = dict(finetune="full", max_steps=4, checkpointing_steps=2, shuffle=True, lr_scheduler="cosine",
              lr_warmup_steps=1)
    straight = train(config(model_dir, shard_dir, tmp_path / "straight", **kw))
    real_step, calls = train_mod.compute_step, []

    def crashing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated preemption")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_mod, "compute_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(config(model_dir, shard_dir, tmp_path / "resumed", **kw))
    monkeypatch.setattr(train_mod, "compute_step", real_step)
    ckpt = tmp_path / "resumed" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "pytorch_lora_weights.safetensors").exists()
    resumed = train(config(model_dir, shard_dir, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["losses"] == straight["losses"] and len(resumed["losses"]) == 4
    a, b = unet_state(tmp_path / "straight" / "unet"), unet_state(tmp_path / "resumed" / "unet")
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- evaluation hook
def test_eval_logs_rewards_at_the_expected_steps_deterministically_without_changing_training(
        model_dir, shard_dir, tmp_path):
    on = train(config(model_dir, shard_dir, tmp_path / "on", max_steps=3, **eval_kw()))
    rows = read_eval_log(tmp_path / "on" / "eval_log.csv")
    assert [(r["step"], r["reward"]) for r in rows] == [
        (2, "sharpness"), (2, "colourfulness"), (3, "sharpness"), (3, "colourfulness")]  # every 2 steps and the end
    assert all(math.isfinite(r["mean"]) for r in rows)
    assert rows[0]["mean"] != rows[2]["mean"]  # the images come from the LoRA as trained so far
    with open(tmp_path / "on" / "eval_log.csv", newline="") as f:
        assert csv.DictReader(f).fieldnames == ["step", "reward", "mean"]
    assert on["eval"]["steps"] == [2, 3] and set(on["eval"]["last"]) == {"sharpness", "colourfulness"}
    assert on["eval"]["means"]["sharpness"] == [rows[0]["mean"], rows[2]["mean"]]
    assert json.loads((tmp_path / "on" / "train_summary.json").read_text())["eval"] == on["eval"]

    # the same run again (prompts from a file this time): the same scores
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(EVAL_PROMPTS) + "\n")
    assert load_eval_prompts([str(prompt_file)]) == EVAL_PROMPTS
    again = train(config(model_dir, shard_dir, tmp_path / "again", max_steps=3,
                         **eval_kw(eval_prompts=str(prompt_file))))
    assert read_eval_log(tmp_path / "again" / "eval_log.csv") == rows
    assert again["eval"] == {**on["eval"], "log_path": str(tmp_path / "again" / "eval_log.csv")}

    # evaluation leaves training alone: the same losses and LoRA weights as with eval off
    off = train(config(model_dir, shard_dir, tmp_path / "off", max_steps=3))
    assert "eval" not in off and not (tmp_path / "off" / "eval_log.csv").exists()
    assert off["losses"] == on["losses"]
    a, b = load_file(on["lora_path"]), load_file(off["lora_path"])
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_eval_sees_the_trained_model_and_works_with_full_finetune(model_dir, shard_dir, tmp_path):
    """Eval images come from the current weights: a full fine-tune with a large step scores differently
    after training than the untrained model would (eval at step 1 vs a run with learning rate ~0)."""
    kw = eval_kw(eval_every=1)
    trained = train(config(model_dir, shard_dir, tmp_path / "a", finetune="full", learning_rate=1e-2, **kw))
    frozen = train(config(model_dir, shard_dir, tmp_path / "b", finetune="full", learning_rate=1e-12, **kw))
    assert trained["eval"]["steps"] == [1] == frozen["eval"]["steps"]
    assert trained["eval"]["last"]["sharpness"] != frozen["eval"]["last"]["sharpness"]


def test_eval_config_is_checked():
    base = dict(pretrained_model="m", shards=["s"], output_dir="o")
    with pytest.raises(ValueError, match="eval_prompts"):
        TrainConfig(**base, eval_every=2, eval_rewards=EVAL_REWARDS)
    with pytest.raises(ValueError, match="eval_rewards"):
        TrainConfig(**base, eval_every=2, eval_prompts=EVAL_PROMPTS)
    with pytest.raises(ValueError, match="config.eval_rewards.0.name: unknown reward 'nope'"):  # a plug-in name:
        preflight_train(TrainConfig(**base, eval_every=2, eval_prompts=EVAL_PROMPTS, eval_rewards=[{"name": "nope"}]))
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(**base, eval_every=-1)
    with pytest.raises(ValueError, match="finetune"):
        TrainConfig(**base, finetune="partial")
    cfg = TrainConfig(**base, eval_every=2, eval_prompts=EVAL_PROMPTS, eval_rewards=EVAL_REWARDS)
    assert json.loads(json.dumps(dump_config(cfg)))["eval_rewards"][0]["name"] == "sharpness"
    # eval settings do not change what a step computes: a checkpoint resumes under other values
    assert train_mod.config_key(cfg) == train_mod.config_key(TrainConfig(**base))
    assert train_mod.config_key(TrainConfig(**base, finetune="full")) != train_mod.config_key(TrainConfig(**base))
