"""Tiny randomly initialised models for the offline demo and the tests.

They are built from configs (no hub), saved to a directory and then loaded
back through the same ``from_pretrained`` / checkpoint path a real model takes,
so the demo exercises the real loading code.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

TINY_CLIP_NAME = "synpref-tiny-clip"


def _write_clip_tokenizer_files(out_dir: Path) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) from open_clip's bundled vocabulary.

    open_clip ships the same 49408-token BPE vocabulary as OpenAI CLIP / Stable
    Diffusion inside its wheel, so a real tokenizer is available offline.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")


def build_tiny_sd_pipeline(seed: int = 0, scheduler: str = "pndm", tokenizer_dir: str | os.PathLike | None = None):
    """A working StableDiffusionPipeline with ~2M random parameters (64x64 output)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    import tempfile

    with tempfile.TemporaryDirectory(prefix="synpref-tok-") as scratch:  # the pipeline saves its own copy
        tokenizer_dir = Path(tokenizer_dir or scratch)
        if not (tokenizer_dir / "vocab.json").exists():
            _write_clip_tokenizer_files(tokenizer_dir)
        # from_pretrained: transformers 5's CLIPTokenizer(vocab_file=..., merges_file=...) ignores both files
        # and keeps a 2-token vocabulary, so every prompt would encode alike.
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), pad_token="<|endoftext|>", model_max_length=77)
    sched_kwargs = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
    schedulers = {
        "pndm": lambda: PNDMScheduler(skip_prk_steps=True, **sched_kwargs),
        "ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **sched_kwargs),
        "euler": lambda: EulerDiscreteScheduler(**sched_kwargs),
    }
    if scheduler not in schedulers:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(schedulers)}")
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=schedulers[scheduler](),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd_pipeline(path: str | os.PathLike, seed: int = 0, scheduler: str = "pndm") -> str:
    """Build a tiny SD pipeline and ``save_pretrained`` it (safetensors) to ``path``."""
    pipe = build_tiny_sd_pipeline(seed=seed, scheduler=scheduler)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_open_clip(out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Save a random tiny open_clip model: a JSON architecture config plus a safetensors checkpoint.

    Returns the reward params that load it (``model_config`` + ``checkpoint``).
    """
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / f"{TINY_CLIP_NAME}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CONFIG, indent=2))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)  # what create_model builds for this config, minus its warnings
    ckpt = out / f"{TINY_CLIP_NAME}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return {"model": TINY_CLIP_NAME, "model_config": str(cfg_path), "checkpoint": str(ckpt)}


def save_tiny_hf_clip(out_dir: str | os.PathLike, seed: int = 0, side: int = 64) -> dict:
    """Save a random tiny transformers ``CLIPModel`` (``model/``, safetensors) and its PIL image processor +
    tokenizer (``processor/``: shortest side to ``side``, centre crop, as the LAION CLIP-H repo's), the
    layout ``pickscore`` loads (and ``mps`` uses for its processor and CLIP config).

    Returns the reward params that load it (``model`` + ``processor``).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = Path(out_dir)
    _write_clip_tokenizer_files(out / "bpe")
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "bpe"), pad_token="<|endoftext|>", model_max_length=77)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(out / "processor"))
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=1),
        vision_config=dict(image_size=side, patch_size=16, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(str(out / "model"), safe_serialization=True)
    return {"model": str(out / "model"), "processor": str(out / "processor")}


def save_tiny_safety_checker(out_dir: str | os.PathLike, seed: int = 0, side: int = 64) -> dict:
    """Save a random tiny diffusers ``StableDiffusionSafetyChecker`` with the CompVis repo's legacy
    ``preprocessor_config.json`` (shortest side to ``side``, centre crop). Returns ``nsfw``'s params."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    out = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(image_size=side, patch_size=16, hidden_size=32, intermediate_size=37,
                           num_attention_heads=4, num_hidden_layers=2),
        projection_dim=16)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():  # thresholds near the random cosines, so scores spread on both sides of 0
        checker.concept_embeds_weights.uniform_(-0.2, 0.2)
        checker.special_care_embeds_weights.fill_(1.5)
    checker.save_pretrained(str(out), safe_serialization=True)
    legacy = {"crop_size": side, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
              "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "resample": 3, "size": side}
    (out / "preprocessor_config.json").write_text(json.dumps(legacy))
    return {"model": str(out)}


def save_demo_models(models_dir: str | os.PathLike) -> dict:
    """Everything the demo job needs, idempotent: two SD generators and a CLIP reward."""
    root = Path(models_dir)
    done = root / "_complete.json"
    if done.exists():
        return json.loads(done.read_text())
    paths = {
        "tiny-sd-a": save_tiny_sd_pipeline(root / "tiny-sd-a", seed=1, scheduler="pndm"),
        "tiny-sd-b": save_tiny_sd_pipeline(root / "tiny-sd-b", seed=2, scheduler="ddim"),
        "clip": save_tiny_open_clip(root / "tiny-clip", seed=3),
    }
    done.write_text(json.dumps(paths, indent=2))
    return paths
