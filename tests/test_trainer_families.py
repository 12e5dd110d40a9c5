"""SDXL and SD3 (flow matching) families on tiny random pipelines built from configs (offline, CPU)."""
import io
import json
import math

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

from synpref.demo.tiny_models import _write_clip_tokenizer_files
from synpref.demo.tiny_families import save_tiny_sd3, save_tiny_sdxl  # noqa
from synpref.training.config import TrainConfig
from synpref.training.data import RankedItem, collate_ranked
from synpref.training.families import available_families, family_for
from synpref.training.families.sd3 import StableDiffusion3Family
from synpref.training.families.sdxl import StableDiffusionXLFamily
from synpref.training.train import add_lora, compute_step, load_models, train
from trainer_fixtures import one_thread  # noqa: F401 (fixture)


RES = 32  # training resolution; the VAE downsamples by 8


# The tiny pipelines the generator tests use too (demo/tiny_families.py).
BUILDERS = {"sdxl": (save_tiny_sdxl, StableDiffusionXLFamily), "sd3": (save_tiny_sd3, StableDiffusion3Family)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-models")
    return {name: build(root / name) for name, (build, _) in BUILDERS.items()}


def png(rng):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked")
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(out / "ranked-00000.tar"), mtime=0) as sink:
        for pid, prompt, phis in [("a1", "a red cube", [1.0, 0.5, 0.0]), ("a2", "two cats", [0.8, 0.2])]:
            cands = [{"image": f"img{i}.png", "rank": i + 1, "phi": p} for i, p in enumerate(phis)]
            sink.write({"__key__": pid, "json": json.dumps({"prompt": prompt, "candidates": cands}).encode(),
                        **{f"img{i}.png": png(rng) for i in range(len(phis))}})
    return out


def config(model_dir, shard_dir, out, **kw):
    return TrainConfig(**{**dict(pretrained_model=model_dir, shards=[str(shard_dir)], output_dir=str(out),
                                 resolution=RES, batch_size=2, max_steps=2), **kw})


def fixed_batch(phis_per_prompt, seed=0):
    gen = torch.Generator().manual_seed(seed)
    items = [RankedItem(f"p{i}", f"prompt number {i}", torch.rand(len(phis), 3, RES, RES, generator=gen) * 2 - 1,
                        torch.tensor(phis), torch.arange(1, len(phis) + 1))
             for i, phis in enumerate(phis_per_prompt)]
    return collate_ranked(items)


def test_registry_lists_every_family(model_dirs):
    assert {"StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"} <= set(
        available_families())
    for name, (_, cls) in BUILDERS.items():
        assert family_for(model_dirs[name]) is cls


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_overfit_one_batch_lowers_loss_and_raises_accuracy(model_dirs, shard_dir, tmp_path, family):
    cfg = config(model_dirs[family], shard_dir, tmp_path)
    torch.manual_seed(0)
    models = load_models(cfg)
    optimizer = torch.optim.Adam(add_lora(models.denoiser, cfg, models.lora_target_modules), lr=3e-3)
    batch = fixed_batch([[1.0, 0.5, 0.0], [0.9, 0.1]])
    outs = []
    for _ in range(8):
        out = compute_step(models, batch, cfg, torch.Generator().manual_seed(0))  # same noise every step
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        outs.append(out)
    assert outs[0].metrics["implicit_acc"] == 0.0  # LoRA B = 0: model == reference, every pair tied
    assert outs[0].metrics["model_err"] == outs[0].metrics["ref_err"]
    assert outs[-1].loss.item() < outs[0].loss.item()
    assert outs[-1].metrics["implicit_acc"] > 0.5


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_k2_rankdpo_is_gain_weighted_diffusion_dpo(model_dirs, shard_dir, tmp_path, family):
    cfg = config(model_dirs[family], shard_dir, tmp_path, beta=300.0)
    torch.manual_seed(0)
    models = load_models(cfg)
    add_lora(models.denoiser, cfg, models.lora_target_modules)
    with torch.no_grad():  # a non-zero LoRA, so the model differs from the reference
        for name, p in models.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = fixed_batch([[0.8, 0.3]])
    rank = compute_step(models, batch, cfg, torch.Generator().manual_seed(5))
    dpo_cfg = config(model_dirs[family], shard_dir, tmp_path, loss="dpo", beta=600.0)
    dpo = compute_step(models, batch, dpo_cfg, torch.Generator().manual_seed(5))
    weight = abs(2**0.8 - 2**0.3) * abs(1 / math.log(2) - 1 / math.log(3))
    assert dpo.loss.item() != pytest.approx(math.log(2), rel=1e-3)  # the pair is not tied
    assert rank.loss.item() == pytest.approx(weight * dpo.loss.item(), rel=1e-5)
    assert rank.metrics == dpo.metrics  # same noise, sigma and errors


def test_flow_matching_noising_and_shared_sigma(model_dirs, shard_dir, tmp_path):
    models = load_models(config(model_dirs["sd3"], shard_dir, tmp_path))
    t = models.sample_timesteps(1000, torch.Generator().manual_seed(0))
    sigma = models._sigma(t, 1)
    assert torch.allclose(sigma * 1000, t) and 0 < sigma.min() and sigma.max() <= 1  # shifted schedule, t = 1000 sigma
    assert sigma.median() > 0.6  # logit-normal at u = 0.5 with shift 3 -> sigma 0.75
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    s = sigma[:2].reshape(2, 1, 1, 1)
    assert torch.allclose(models.noisy_input(x0, noise, t[:2]), (1 - s) * x0 + s * noise)
    assert torch.equal(models.target(x0, noise, t[:2]), noise - x0)
    # two identical images of one prompt get the same sigma and noise, hence the same error
    batch = fixed_batch([[1.0, 0.0]])
    batch.images[1] = batch.images[0]
    add_lora(models.denoiser, config(model_dirs["sd3"], shard_dir, tmp_path), models.lora_target_modules)
    out = compute_step(models, batch, config(model_dirs["sd3"], shard_dir, tmp_path, noise="shared"),
                       torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(abs(2**1 - 2**0) * abs(1 / math.log(2) - 1 / math.log(3)) * math.log(2))


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_train_saves_a_lora_the_family_pipeline_loads(model_dirs, shard_dir, tmp_path, family):
    import diffusers

    summary = train(config(model_dirs[family], shard_dir, tmp_path, learning_rate=1e-2, lora_alpha=8))
    assert summary["steps"] == 2 and all(math.isfinite(x) for x in summary["losses"])
    assert summary["family"] == BUILDERS[family][1].pipeline_class
    assert len(summary["metrics"]) == 2 and (tmp_path / "train_log.csv").read_text().count("\n") == 3

    pipe = getattr(diffusers, summary["family"]).from_pretrained(model_dirs[family])

    def generate():
        return pipe("a red cube", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    with torch.no_grad():
        base = generate()
        pipe.load_lora_weights(summary["output_dir"])
        tuned = generate()
    denoiser = pipe.components["unet" if family == "sdxl" else "transformer"]
    (adapter,) = denoiser.peft_config.values()
    assert adapter.r == 4 and adapter.lora_alpha == 8
    # every saved tensor found its layer (a key-format mismatch drops layers with only a warning)
    assert sum("lora_" in name for name, _ in denoiser.named_parameters()) == len(load_file(summary["lora_path"]))
    assert np.abs(base - tuned).max() > 1e-6


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_lora_file_round_trips_exactly_for_resume(model_dirs, shard_dir, tmp_path, family):
    from peft.utils import get_peft_model_state_dict

    cfg = config(model_dirs[family], shard_dir, tmp_path)
    trained, fresh = load_models(cfg), load_models(cfg)
    for models in (trained, fresh):
        add_lora(models.denoiser, cfg, models.lora_target_modules)
    with torch.no_grad():
        for p in trained.denoiser.parameters():
            if p.requires_grad:
                p.normal_()
    trained.save_lora(tmp_path, trained.denoiser)
    fresh.load_lora(tmp_path, fresh.denoiser)
    a, b = get_peft_model_state_dict(trained.denoiser), get_peft_model_state_dict(fresh.denoiser)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- pair_mask (min_pair_agreement): the loss branches the trainer feeds from RankedBatch.pair_mask
def test_pair_mask_removes_pairs_from_both_losses():
    from synpref.training.losses import preference_pairs, rankdpo_loss, rankdpo_loss_batched, pairwise_dpo_loss

    f64 = dict(dtype=torch.float64)
    model_err, ref_err = torch.tensor([0.10, 0.20, 0.30], **f64), torch.tensor([0.12, 0.18, 0.30], **f64)
    phi, rank, beta = torch.tensor([1.0, 0.5, 0.0], **f64), torch.tensor([1, 2, 3]), 50.0
    s = (model_err - ref_err).tolist()
    inv_d = [1 / math.log(2), 1 / math.log(3), 1 / math.log(4)]
    gain = [2**p - 1 for p in phi.tolist()]

    def term(w, l):
        return abs(gain[w] - gain[l]) * abs(inv_d[w] - inv_d[l]) * -math.log(1 / (1 + math.exp(beta * (s[w] - s[l]))))

    mask = ~torch.eye(3, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = False  # pair (0, 1) filtered out
    got = rankdpo_loss(model_err, ref_err, phi, rank, beta, pair_mask=mask).item()
    assert got == pytest.approx(term(0, 2) + term(1, 2), rel=1e-9)
    group = torch.zeros(3, dtype=torch.long)
    assert rankdpo_loss_batched(model_err, ref_err, phi, rank, group, beta, pair_mask=mask).item() == pytest.approx(got)
    w, l = preference_pairs(phi, rank, group, "all", mask)
    assert sorted(zip(w.tolist(), l.tolist())) == [(0, 2), (1, 2)]
    best_worst_masked = mask.clone()
    best_worst_masked[0, 2] = best_worst_masked[2, 0] = False
    w, _ = preference_pairs(phi, rank, group, "best_worst", best_worst_masked)
    assert len(w) == 0  # the filtered best-worst pair is dropped, not replaced
    loss = pairwise_dpo_loss(model_err, ref_err, phi, rank, group, beta, "best_worst", best_worst_masked)
    assert loss.item() == 0.0


def test_trainer_applies_the_batch_pair_mask(model_dirs, shard_dir, tmp_path):
    cfg = config(model_dirs["sdxl"], shard_dir, tmp_path)
    models = load_models(cfg)
    add_lora(models.denoiser, cfg, models.lora_target_modules)
    batch = fixed_batch([[1.0, 0.0], [0.9, 0.1]])
    full = compute_step(models, batch, cfg, torch.Generator().manual_seed(0)).loss.item()
    batch.pair_mask = torch.block_diag(torch.zeros(2, 2, dtype=torch.bool), ~torch.eye(2, dtype=torch.bool))
    masked = compute_step(models, batch, cfg, torch.Generator().manual_seed(0))
    # LoRA B = 0: each pair costs Delta * ln 2; prompt 0's pair is gone, the mean over 2 prompts stays
    delta = lambda a, b: abs(2**a - 2**b) * abs(1 / math.log(2) - 1 / math.log(3))  # noqa: E731
    assert full == pytest.approx((delta(1.0, 0.0) + delta(0.9, 0.1)) * math.log(2) / 2, rel=1e-5)
    assert masked.loss.item() == pytest.approx(delta(0.9, 0.1) * math.log(2) / 2, rel=1e-5)
