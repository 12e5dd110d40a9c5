"""The full-size cost benches (bench/full_size_models.py, bench_full_size.py, gpu_cost.py) stay true to the job
files and to the released architectures, and their FLOP counts and projections add up.

Everything runs on PyTorch's meta device: no weights are allocated, nothing is computed (seconds).
"""
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from synpref.schemas.config import load_build_config
from synpref.training.config import TrainConfig
from synpref.schemas.loading import load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import bench_full_size  # noqa: E402
import full_size_models as fsm  # noqa: E402
import gpu_cost  # noqa: E402


def _stage(model, name):
    (stage,) = [s for s in fsm.ALL_STAGES if s.model == model and s.name == name]
    return stage


def test_stage_settings_are_the_jobs():
    """Steps, CFG, dtype and resolution of every denoiser stage are those jobs/syn_pic.yaml runs, and the training
    stages' step count and batch are those of the training jobs: the projection cannot drift from the recipe."""
    job = load_build_config(str(ROOT / "jobs" / "syn_pic.yaml"))
    denoisers = {"sdxl": "unet", "sd3_medium": "transformer (MMDiT)", "pixart_sigma": "transformer (DiT-XL/2)"}
    for g in job.generators:
        assert (g.height, g.width) == (fsm.RESOLUTION, fsm.RESOLUTION)
        if g.id == "stable_cascade":
            prior, decoder = _stage(g.id, "prior (stage C)"), _stage(g.id, "decoder (stage B)")
            assert (prior.calls, prior.cfg) == (g.prior_num_inference_steps, g.prior_guidance_scale > 1)
            assert (decoder.calls, decoder.cfg) == (g.num_inference_steps, g.decoder_guidance_scale > 1)
            stages = [prior, decoder]
        else:
            stage = _stage(g.id, denoisers[g.id])
            assert (stage.calls, stage.cfg) == (g.num_inference_steps, g.guidance_scale > 1)
            stages = [stage]
        assert all(s.dtype == g.dtype for s in stages)
    assert {r.name for r in job.rewards} == {s.model for s in fsm.REWARDS}
    assert {g.id for g in job.generators} == {s.model for s in fsm.GENERATION}
    for name in ("sdxl", "sd3"):
        train = load_config(TrainConfig, str(ROOT / "jobs" / f"syn_pic_train_{name}.yaml"))
        processes = 8  # the jobs' `accelerate launch --num_processes 8`
        assert train.max_steps == fsm.TRAIN_STEPS and train.resolution == fsm.RESOLUTION
        assert processes * train.batch_size * train.gradient_accumulation_steps == fsm.TRAIN_PROMPTS_PER_STEP
        assert train.gradient_checkpointing and not train.cache_latents and train.cache_text_embeddings


@pytest.mark.parametrize("model,name,params", [
    # parameter counts of the released checkpoints (their safetensors headers), buffers excluded
    ("sdxl", "text_encoder (CLIP-L)", 123_060_480),
    ("sdxl", "text_encoder_2 (CLIP-G)", 694_659_840),
    ("sdxl", "unet", 2_567_463_684),
    ("sdxl", "vae decode", 83_653_863),
    ("sd3_medium", "text_encoder_3 (T5-XXL)", 4_762_310_656),
    ("sd3_medium", "transformer (MMDiT)", 2_028_328_000),
])
def test_architectures_have_the_released_parameter_counts(model, name, params):
    with torch.device("meta"):
        module = _stage(model, name).build()
    assert sum(p.numel() for p in module.parameters()) == params


def test_flop_count_equals_the_transformer_formula():
    """CLIP-L over 77 tokens: 2 FLOPs per multiply-add of every linear layer per token, plus QK^T and AV."""
    layers, d, ff, n = 12, 768, 3072, 77
    linear = 2 * n * layers * (4 * d * d + 2 * d * ff)
    attention = layers * 2 * (2 * n * n * d)
    stage = _stage("sdxl", "text_encoder (CLIP-L)")
    assert fsm.count_flops(stage) == linear + attention
    assert fsm.count_flops(stage, batch=3) == 3 * (linear + attention)
    assert fsm.count_flops(replace(stage, cfg=True)) == 2 * (linear + attention)


def test_training_stage_counts_the_backward():
    """The policy pass (forward, checkpoint recomputation, backward to the input) costs between 2 and 4 forwards;
    the reference pass is one forward."""
    forward = fsm.count_flops(_stage("train_sd3_medium", "transformer reference forward"))
    train = fsm.count_flops(_stage("train_sd3_medium", "transformer policy forward + backward"))
    assert 2 * forward < train < 4 * forward


def test_projection_arithmetic():
    rows = [{"model": "sdxl", "dtype": "float16", "flops_per_image": 600e12},
            {"model": "sdxl", "dtype": "float16", "flops_per_image": 10e12},
            {"model": "hpsv2", "dtype": "float32", "flops_per_image": 0.4e12}]
    p = bench_full_size.projection(rows, [0.5], usd=2.0, prompts=1000)
    sdxl_hours = 610e12 * 1000 / (312e12 * 0.5) / 3600
    hps_hours = 0.4e12 * 4000 / (19.5e12 * 0.5) / 3600  # 4 candidates per prompt; float32 peak
    assert p["models"]["sdxl"]["a100_hours"]["0.50"] == pytest.approx(sdxl_hours)
    assert p["models"]["hpsv2"]["images"] == 4000
    assert p["summary"]["dataset"]["a100_hours"]["0.50"] == pytest.approx(sdxl_hours + hps_hours)
    assert p["summary"]["dataset"]["usd"]["0.50"] == pytest.approx(2.0 * (sdxl_hours + hps_hours))
    json.dumps(p, allow_nan=False)


def test_gpu_cost_dry_run_writes_strict_json(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert gpu_cost.main(["--dry-run", "--only", "image_reward", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["summary"]["models"]["image_reward"]["images"] == 4 * fsm.PAPER_PROMPTS
    assert "DRY RUN" in capsys.readouterr().out


def test_gpu_cost_refuses_bad_arguments(capsys):
    assert gpu_cost.main(["--batch", "0"]) == 2
    assert gpu_cost.main(["--dry-run", "--only", "no_such_model"]) == 2
    err = capsys.readouterr().err
    assert "--batch" in err and "no_such_model" in err


def test_gpu_cost_summary_takes_the_faster_batch_and_scales_to_an_a100():
    def row(model, stage, batch, seconds, dtype="float16", calls=50):
        return {"model": model, "stage": stage, "batch": batch, "dtype": dtype, "calls": calls,
                "flops_per_call": 13e12, "seconds_per_call": seconds, "seconds_per_image": seconds / batch * calls,
                "device_peak_flops": 989e12 if dtype != "float32" else 67e12}
    rows = [row("sdxl", "unet", 1, 0.1), row("sdxl", "unet", 4, 0.3),  # batch 4: 0.075 s per image-call
            row("hpsv2", "open_clip ViT-H-14", 4, 0.2, dtype="float32", calls=1)]
    s = gpu_cost.summarise({"rows": rows, "skipped": ["pickscore/CLIP-H"]}, "cpu", prompts=100)
    sdxl, hps = s["models"]["sdxl"], s["models"]["hpsv2"]
    assert sdxl["seconds_per_image"] == pytest.approx(0.075 * 50)
    assert sdxl["gpu_hours"] == pytest.approx(0.075 * 50 * 100 / 3600)
    assert sdxl["a100_hours_at_same_mfu"] == pytest.approx(0.075 * 50 * 100 / 3600 * 989 / 312)
    assert hps["a100_hours_at_same_mfu"] == pytest.approx(0.05 * 400 / 3600 * 67 / 19.5)
    assert s["gpu_hours"]["labelling"] == pytest.approx(0.05 * 400 / 3600)
    assert not s["complete"]  # two generators and three rewards were not timed
    json.dumps(s, allow_nan=False)
