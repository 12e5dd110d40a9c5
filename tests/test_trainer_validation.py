"""Held-out validation during training: the split never overlaps training, the figures are what the model
computes (recomputed here from the saved LoRA with diffusers directly), fixed per evaluation, and a resumed
run reports the same validation figures as a straight one."""
import csv
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import synpref.training.train as train_mod
from synpref.training.config import TrainConfig
from synpref.training.data import open_dataset, open_validation
from synpref.training.train import add_lora, load_models, train
from synpref.training.validation import Validator, prompt_seed
from trainer_fixtures import model_dir, one_thread, write_ranked_shard  # noqa: F401 (fixtures)

PROMPTS = [(f"p{i:02d}", f"prompt number {i}", [1.0, 0.5, 0.0] if i % 2 else [0.8, 0.2]) for i in range(12)]
HELD_OUT = [("v1", "a held out cube", [1.0, 0.4, 0.0]), ("v2", "a held out cat", [0.9, 0.1])]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (root / "train").mkdir()
    write_ranked_shard(root / "train" / "ranked-00000.tar", PROMPTS[:6], rng)
    write_ranked_shard(root / "train" / "ranked-00001.tar", PROMPTS[6:], rng)
    (root / "val").mkdir()
    write_ranked_shard(root / "val" / "ranked-00000.tar", HELD_OUT, rng)
    return root


def config(model_dir, shards, out, **kw):
    values = dict(pretrained_model=str(model_dir), shards=[str(shards / "train")], output_dir=str(out),
                  resolution=32, batch_size=2, max_steps=4, learning_rate=1e-2, seed=5)
    return TrainConfig(**{**values, **kw})


def tar_prompt_ids(folder) -> set[str]:
    """Every prompt id in a folder of ranked tars, read with tarfile (not the trainer's reader)."""
    ids = set()
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    ids.add(json.loads(tar.extractfile(member).read())["prompt_id"])
    return ids


def test_validation_fraction_never_overlaps_training_on_any_process_count(model_dir, shards, tmp_path):
    cfg = config(model_dir, shards, tmp_path, validation_fraction=0.4, validation_every=1)
    held = [item.prompt_id for item in open_validation(cfg)]
    trained = [item.prompt_id for item in open_dataset(cfg)]
    everything = tar_prompt_ids(shards / "train")
    assert held and trained and not set(held) & set(trained)
    assert sorted(held + trained) == sorted(everything)  # each prompt on exactly one side, once
    # two processes (one shard each): their shares together are the same training set
    shares = [item.prompt_id for r in range(2) for item in open_dataset(cfg, rank=r, world_size=2)]
    assert sorted(shares) == sorted(trained)
    # the split is the prompt's, not the seed's or the order's
    reshuffled = config(model_dir, shards, tmp_path, validation_fraction=0.4, validation_every=1, seed=9,
                        shuffle=True)
    assert sorted(i.prompt_id for i in open_validation(reshuffled)) == sorted(held)


def _image_tensor(data: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def recompute(model_dir, lora_dir, val_tar, seed: int, beta: float) -> tuple[float, float]:
    """Validation loss and implicit accuracy from diffusers' own pipeline with the saved LoRA, against the
    plain UNet as reference: per prompt, its seeded VAE sample, timestep and shared noise; RankDPO's pair sum."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(lora_dir))
    reference = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(str(model_dir), subfolder="scheduler")  # training's forward process
    losses, correct, pairs = [], 0, 0
    with tarfile.open(val_tar) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    for key in sorted({name.split(".")[0] for name in members}):
        meta = json.loads(members[f"{key}.json"])
        cands = meta["candidates"]
        images = torch.stack([_image_tensor(members[f"{key}.{c['image']}"]) for c in cands])
        phi = [c["phi"] for c in cands]
        rank = [c["rank"] for c in cands]
        g = torch.Generator().manual_seed(prompt_seed(seed, meta["prompt_id"]))
        with torch.no_grad():
            latents = pipe.vae.encode(images).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
            t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g).expand(len(cands))
            noise = torch.randn((1, *latents.shape[1:]), generator=g).expand_as(latents)
            noisy = scheduler.add_noise(latents, noise, t)
            ids = pipe.tokenizer([meta["prompt"]], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            text = pipe.text_encoder(ids)[0].expand(len(cands), -1, -1)
            model_err = ((pipe.unet(noisy, t, text).sample - noise) ** 2).mean(dim=(1, 2, 3))
            ref_err = ((reference(noisy, t, text).sample - noise) ** 2).mean(dim=(1, 2, 3))
        s = (model_err - ref_err).double().tolist()
        loss = 0.0
        for w in range(len(cands)):
            for l in range(len(cands)):
                if phi[w] > phi[l]:
                    delta = abs(2 ** phi[w] - 2 ** phi[l]) * abs(1 / math.log(1 + rank[w]) - 1 / math.log(1 + rank[l]))
                    loss += -delta * F.logsigmoid(torch.tensor(-beta * (s[w] - s[l]))).item()
                    correct += s[w] < s[l]
                    pairs += 1
        losses.append(loss)
    return sum(losses) / len(losses), correct / pairs


def test_figures_are_the_models_and_training_is_unchanged(model_dir, shards, tmp_path):
    plain = train(config(model_dir, shards, tmp_path / "plain"))
    cfg = config(model_dir, shards, tmp_path / "val", validation_shards=[str(shards / "val")], validation_every=2)
    summary = train(cfg)
    assert summary["losses"] == plain["losses"]  # validation draws nothing from training's randomness
    val = summary["validation"]
    assert val["source"] == "validation_shards" and val["prompts"] == 2 and val["pairs"] == 3 + 1
    assert val["steps"] == [2, 4] and val["last"]["step"] == 4
    loss, acc = recompute(model_dir, tmp_path / "val", shards / "val" / "ranked-00000.tar", cfg.seed, cfg.beta)
    assert val["last"]["implicit_acc"] == pytest.approx(acc, abs=1e-12)
    assert val["last"]["loss"] == pytest.approx(loss, rel=1e-4)
    # logged beside the training figures: the CSV's validation columns on steps 2 and 4 only
    with open(summary["log_path"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["val_implicit_acc"] != "" for r in rows] == [False, True, False, True]
    assert float(rows[3]["val_loss"]) == val["loss"][1]
    saved = json.loads((tmp_path / "val" / "train_summary.json").read_text())
    assert saved["validation"] == val


def test_two_evaluations_of_the_same_weights_are_identical(model_dir, shards, tmp_path):
    cfg = config(model_dir, shards, tmp_path, validation_shards=[str(shards / "val")], validation_every=1)
    models = load_models(cfg)
    params = add_lora(models.denoiser, cfg, models.lora_target_modules)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # LoRA B starts at zero: move it, or every margin is 0
    validator = Validator(cfg, models)
    rng = torch.random.get_rng_state()
    first, second = validator.run(1), validator.run(2)
    assert {k: v for k, v in first.items() if k != "step"} == {k: v for k, v in second.items() if k != "step"}
    assert torch.equal(rng, torch.random.get_rng_state())  # no global randomness used
    # the noise is what fixes the figures: another seed draws other noise and gives another loss
    other = Validator(config(model_dir, shards, tmp_path, validation_shards=[str(shards / "val")],
                             validation_every=1, seed=6), models).run(1)
    assert other["loss"] != first["loss"]


def test_resumed_run_reports_the_straight_runs_validation(model_dir, shards, tmp_path, monkeypatch):
    kw = dict(validation_fraction=0.4, validation_every=1, checkpointing_steps=2, shuffle=True)
    straight = train(config(model_dir, shards, tmp_path / "straight", **kw))
    real_step, calls = train_mod.compute_step, []

    def crashing_step(models, batch, *args, **kwargs):
        if models.denoiser.training:  # training micro-batches only, not validation's
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("simulated preemption")
        return real_step(models, batch, *args, **kwargs)

    monkeypatch.setattr(train_mod, "compute_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(config(model_dir, shards, tmp_path / "resumed", **kw))
    monkeypatch.setattr(train_mod, "compute_step", real_step)
    resumed = train(config(model_dir, shards, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed["resumed_from"].endswith("checkpoint-2")
    assert resumed["losses"] == straight["losses"]
    assert resumed["validation"] == straight["validation"] and resumed["validation"]["steps"] == [1, 2, 3, 4]


@pytest.mark.parametrize("kw, message", [
    (dict(validation_every=2), "validation_every > 0 needs validation_shards or validation_fraction"),
    (dict(validation_fraction=0.2), "need validation_every > 0"),
    (dict(validation_fraction=1.0, validation_every=1), "validation_fraction must be in [0, 1)"),
    (dict(validation_fraction=0.2, validation_shards=["x"], validation_every=1), "not both"),
    (dict(validation_every=-1), "validation_every must be >= 0"),
])
def test_validation_settings_are_checked_in_one_line(model_dir, shards, tmp_path, kw, message):
    with pytest.raises(ValueError) as e:
        config(model_dir, shards, tmp_path, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_validation_shards_are_named_before_training(model_dir, shards, tmp_path):
    from synpref.training.preflight import preflight_train

    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"^validation_shards: no shards found for .*nope"):
        preflight_train(config(model_dir, shards, tmp_path / "out", validation_shards=[missing], validation_every=1))
