"""Trainer end to end on a tiny random SD model and hand-written ranked shards (offline, CPU)."""
import io
import itertools
import json
import math
import os

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from synpref.schemas.loading import load_config
from synpref.training.config import TrainConfig
from synpref.training.data import RankedShards, collate_ranked
from synpref.training.train import add_lora, compute_loss, load_models, main, train
from trainer_fixtures import model_dir, one_thread  # noqa: F401 (fixtures)


# (prompt_id, prompt, phi per candidate in rank order)
SHARD_0 = [
    ("a1", "a red cube on a blue sphere", [1.0, 0.5, 0.0]),
    ("a2", "two cats", [0.75, 0.5, 0.5, 0.25]),
    ("a3", "a green car", [0.9, 0.1]),
]
SHARD_1 = [
    ("b1", "a lighthouse at night", [0.6, 0.4]),
    ("b2", "a bowl of fruit", [1.0, 0.0, 0.0]),
]


def png(rng: np.random.Generator, size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def ranked_sample(rng, prompt_id, prompt, phis):
    candidates = [
        {"candidate_id": f"{prompt_id}-{i}", "image": f"img{i}.png", "rank": i + 1, "phi": phi,
         "scores": {"clip_score": 0.2}, "lineage": {}}
        for i, phi in enumerate(phis)
    ]
    meta = {"prompt_id": prompt_id, "prompt": prompt, "category": "test", "aggregator": "syn_pic",
            "rewards": ["clip_score"], "candidates": candidates}
    images = {f"img{i}.png": png(rng) for i in range(len(phis))}
    return {"__key__": prompt_id, "json": json.dumps(meta).encode(), **images}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Two shards; the second also holds a one-image sample and an image without JSON (both must be skipped)."""
    out = tmp_path_factory.mktemp("ranked")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(out / "ranked-00000.tar"), mtime=0) as sink:
        for spec in SHARD_0:
            sink.write(ranked_sample(rng, *spec))
    with wds.TarWriter(str(out / "ranked-00001.tar"), mtime=0) as sink:
        sink.write(ranked_sample(rng, *SHARD_1[0]))
        sink.write(ranked_sample(rng, "c1", "only one image", [1.0]))
        sink.write({"__key__": "c2", "img0.png": png(rng)})
        sink.write(ranked_sample(rng, *SHARD_1[1]))
    return out


def config(model_dir, shard_dir, out, **kw):
    return TrainConfig(pretrained_model=str(model_dir), shards=[str(shard_dir)], output_dir=str(out),
                       resolution=64, batch_size=2, max_steps=2, **kw)


def test_reader_decodes_in_order_and_skips_bad_samples(shard_dir):
    data = RankedShards([str(shard_dir)], resolution=32)
    items = list(data)
    assert [it.prompt_id for it in items] == [s[0] for s in SHARD_0 + SHARD_1]
    assert dict(data.skipped) == {"too_few_images": 1, "missing_json": 1}
    first = items[0]
    assert first.images.shape == (3, 3, 32, 32) and -1 <= first.images.min() < first.images.max() <= 1
    assert first.phi.tolist() == [1.0, 0.5, 0.0] and first.rank.tolist() == [1, 2, 3]
    batch = collate_ranked(items[:2])
    assert batch.images.shape == (7, 3, 32, 32) and batch.group.tolist() == [0, 0, 0, 1, 1, 1, 1]


def test_reader_survives_a_corrupt_shard(shard_dir, tmp_path):
    (tmp_path / "ranked-99999.tar").write_bytes((shard_dir / "ranked-00000.tar").read_bytes()[:3000])
    data = RankedShards([str(tmp_path / "*.tar"), str(shard_dir / "ranked-00001.tar")], resolution=32)
    assert [it.prompt_id for it in data][-2:] == ["b1", "b2"]


def test_reader_takes_fsspec_urls(shard_dir):
    fs = fsspec.filesystem("memory")
    fs.pipe("/synpref-test/ranked-00000.tar", (shard_dir / "ranked-00000.tar").read_bytes())
    try:
        assert [it.prompt_id for it in RankedShards(["memory://synpref-test"], resolution=16)] == ["a1", "a2", "a3"]
    finally:
        fs.rm("/synpref-test", recursive=True)


def test_missing_shards_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards found"):
        RankedShards([str(tmp_path / "nope-*.tar")], resolution=32)


def test_fixed_batch_steps_lower_the_loss(model_dir, shard_dir, tmp_path):
    cfg = config(model_dir, shard_dir, tmp_path)
    torch.manual_seed(0)
    models = load_models(cfg)
    optimizer = torch.optim.Adam(add_lora(models.unet, cfg), lr=1e-3)
    batch = collate_ranked(list(itertools.islice(RankedShards(cfg.shards, 64), 3)))
    losses = []
    for _ in range(5):
        loss = compute_loss(models, batch, cfg, torch.Generator().manual_seed(0))  # same noise every step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # LoRA B starts at zero, so model == reference, every s = 0 and each pair costs Delta * ln 2.
    inv_d = [1 / math.log(1 + tau) for tau in range(1, 5)]
    initial = [
        sum(abs(2**phis[w] - 2**phis[l]) * abs(inv_d[w] - inv_d[l]) * math.log(2)
            for w in range(len(phis)) for l in range(len(phis)) if phis[w] > phis[l])
        for _, _, phis in SHARD_0
    ]
    assert losses[0] == pytest.approx(sum(initial) / 3, rel=1e-5)
    assert losses[-1] < losses[0]


def test_cli_trains_and_saves_a_loadable_lora(model_dir, shard_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(f"pretrained_model: {model_dir}\nshards: [{shard_dir}]\noutput_dir: {tmp_path / 'out'}\n"
                        "resolution: 64\nbatch_size: 2\nlearning_rate: 1.0e-3\nlora_rank: 4\n")
    summary = main(["--config", str(cfg_path), "--set", "max_steps=3", "--set", "lora_alpha=8"])
    assert summary["steps"] == 3 and len(summary["losses"]) == 3
    assert summary["skipped"] == {"too_few_images": 1, "missing_json": 1}
    assert json.loads((tmp_path / "out" / "train_summary.json").read_text())["losses"] == summary["losses"]

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, text = torch.tensor([500]), torch.zeros(1, 77, 32)
    with torch.no_grad():
        base = pipe.unet(latents, t, text).sample
        pipe.load_lora_weights(summary["output_dir"])
        tuned = pipe.unet(latents, t, text).sample
    assert os.path.isfile(summary["lora_path"]) and summary["lora_path"].endswith(".safetensors")
    (adapter,) = pipe.unet.peft_config.values()
    assert adapter.r == 4 and adapter.lora_alpha == 8  # alpha survives the round trip
    assert not torch.equal(base, tuned)


@pytest.mark.parametrize(
    "options",
    [{"loss": "dpo"}, {"loss": "dpo", "dpo_pairs": "all"}, {"discount_rank": "model", "noise": "per_image"}],
)
def test_loss_options_train(model_dir, shard_dir, tmp_path, options):
    summary = train(config(model_dir, shard_dir, tmp_path, **options))
    assert summary["steps"] == 2 and all(math.isfinite(x) for x in summary["losses"])
    assert summary["config"]["beta"] == (5000.0 if options.get("loss") == "dpo" else 2500.0)


def test_training_is_deterministic(model_dir, shard_dir, tmp_path):
    runs = [train(config(model_dir, shard_dir, tmp_path / str(i), learning_rate=1e-3))["losses"] for i in range(2)]
    assert runs[0] == runs[1]


def test_config_validation_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrained_model: m\nshards: s.tar\noutput_dir: o\nlearning_rate: 1e-4\n")
    cfg = load_config(TrainConfig, path, ["max_steps=7", "shuffle=true", "loss=dpo"])
    assert (cfg.shards, cfg.learning_rate, cfg.max_steps, cfg.shuffle, cfg.beta) == (["s.tar"], 1e-4, 7, True, 5000.0)
    with pytest.raises(ValueError, match=r"loss: 'ipo' is not one of \['rankdpo', 'dpo'\]"):
        load_config(TrainConfig, path, ["loss=ipo"])
    with pytest.raises(ValueError, match="quote it"):
        load_config(TrainConfig, path, ["mixed_precision=no"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['betta'\]"):
        load_config(TrainConfig, path, ["betta=1"])
    with pytest.raises(ValueError, match="max_steps: must be int"):
        load_config(TrainConfig, path, ["max_steps=ten"])
