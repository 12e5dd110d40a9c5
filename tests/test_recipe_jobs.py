"""The paper's recipe as job files (jobs/syn_pic*.yaml) load through the real config loaders, so they never rot.

Nothing runs: the files are parsed and validated as ``synpref build`` / ``synpref train`` would, each
generator's settings are resolved against its pipeline class's ``__call__``, and ``check-models``
lists every file to fetch without any of them present (offline).
"""
import re
from pathlib import Path

import diffusers
import pytest

from synpref.cli import main
from synpref.schemas.config import load_build_config
from synpref.schemas.loading import load_config
from synpref.training.config import TrainConfig
from synpref.transforms.generators.pipeline_call import call_arguments
from synpref.transforms.rewards import create_reward

JOBS = Path(__file__).resolve().parent.parent / "jobs"
# The paper's generators (arXiv 2410.18013, Sec. 3) and the pipeline class each hub repo holds.
PAPER_GENERATORS = {
    "stabilityai/stable-diffusion-xl-base-1.0": "StableDiffusionXLPipeline",
    "stabilityai/stable-diffusion-3-medium-diffusers": "StableDiffusion3Pipeline",
    "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": "PixArtSigmaPipeline",
    "stabilityai/stable-cascade": "StableCascadeCombinedPipeline",
}
PAPER_REWARDS = {"hpsv2", "mps", "pickscore", "vqascore", "image_reward"}


@pytest.fixture(scope="module")
def syn_pic():
    return load_build_config(str(JOBS / "syn_pic.yaml"))


def test_syn_pic_is_the_papers_dataset(syn_pic):
    assert syn_pic.prompts.source == "hf://yuvalkirstain/pickapic_v2_no_images"
    assert syn_pic.prompts.text_field == "caption" and syn_pic.prompts.num_prompts is None
    assert {g.model for g in syn_pic.generators} == set(PAPER_GENERATORS)
    assert syn_pic.candidates_per_generator == 1
    assert {r.name for r in syn_pic.rewards} == PAPER_REWARDS and all(r.rank for r in syn_pic.rewards)
    assert syn_pic.ranking.aggregator == "syn_pic"
    assert syn_pic.rewards[0].params["version"] == "v2.1"
    for g in syn_pic.generators:
        assert re.fullmatch(r"[0-9a-f]{40}", g.revision), f"{g.id}: revision is not a pinned commit"
        assert (g.height, g.width) == (1024, 1024)
    for r in syn_pic.rewards:
        create_reward(r.name, r.params)  # the reward's own parameter checks (no weights load)


def test_every_generator_setting_is_one_its_pipeline_takes(syn_pic):
    args = {g.id: call_arguments(g, getattr(diffusers, PAPER_GENERATORS[g.model])) for g in syn_pic.generators}
    # Stable Cascade's model card: prior 20 steps at guidance 4.0, decoder 10 steps at guidance 0.0.
    assert args["stable_cascade"] == {"height": 1024, "width": 1024, "num_inference_steps": 10,
                                      "prior_num_inference_steps": 20, "prior_guidance_scale": 4.0,
                                      "decoder_guidance_scale": 0.0}
    assert args["sd3_medium"] == {"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 7.0}
    assert args["pixart_sigma"]["max_sequence_length"] == 300 and args["pixart_sigma"]["use_resolution_binning"]


def test_check_models_names_every_file_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["check-models", "--config", str(JOBS / "syn_pic.yaml")]) == 2  # nothing is downloaded here
    out = capsys.readouterr().out
    for repo in [*PAPER_GENERATORS, "stabilityai/stable-cascade-prior", "yuvalkirstain/PickScore_v1",
                 "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "google/flan-t5-xl", "openai/clip-vit-large-patch14-336",
                 "google-bert/bert-base-uncased", "HPS_v2.1_compressed.pt", "MPS_overall.safetensors",
                 "clip-flant5-xl.safetensors", "ImageReward.pt", "med_config.json"]:
        assert repo in out, repo
    lines = [line for line in out.splitlines() if line.startswith(("ok", "MISSING"))]
    assert out.strip().splitlines()[-1] == f"{len(lines)} model locations, {len(lines)} missing"


@pytest.mark.parametrize("name, model", [("syn_pic_train_sdxl.yaml", "stabilityai/stable-diffusion-xl-base-1.0"),
                                         ("syn_pic_train_sd3.yaml", "stabilityai/stable-diffusion-3-medium-diffusers")])
def test_training_jobs_are_the_papers_training(syn_pic, name, model):
    cfg = load_config(TrainConfig, str(JOBS / name))
    assert cfg.pretrained_model == model and cfg.loss == "rankdpo" and cfg.max_steps == 400
    # 8 processes (the launch line in the file) x prompts per process x accumulation = the paper's batch 1024.
    launch = re.search(r"--num_processes (\d+)", (JOBS / name).read_text())
    assert int(launch.group(1)) * cfg.batch_size * cfg.gradient_accumulation_steps == 1024
    assert cfg.revision == next(g.revision for g in syn_pic.generators if g.model == model)
    assert cfg.resolution == 1024
