"""Full-size cost of jobs/syn_pic.yaml: the paper's generators and rewards at their real architecture sizes.

Speed and memory do not depend on weight values, so every model is built from its released
architecture (the numbers of its ``config.json``, written out below) with random weights: no download.

Two parts:

* **Sizes** (always; instant): each component is built on PyTorch's ``meta`` device, so parameters are
  counted without allocating them. Printed: parameters, the published size to compare with, and the
  weights' memory in the job's dtype, per loaded model (what ``model_copies`` planning needs: one copy
  of a generator holds all its components). Activations come on top and need a real run to measure.
* **Timing** (``--time``; allocates the weights): one model's denoiser is materialised with random
  weights and run for ``--steps`` denoising forwards at ``--resolution`` (reduced on CPU), batch
  ``--batch``. The projection to the paper's setting scales seconds per forward by the number of
  latent tokens (1024 px over the measured resolution), which is a **lower bound** for transformers
  (attention grows with the square of the tokens) and about right for the convolution-heavy UNets;
  then by the steps and classifier-free-guidance doubling the job uses, and by the number of images
  (``--prompts``, default the paper's 58K, one image per generator). Numbers from a CPU say what this
  CPU would need; they are no estimate of GPU-hours. On a GPU, run with ``--device cuda --dtype
  float16 --resolution 1024`` and the projection needs no scaling.

Usage::

    python bench/bench_full_size.py                                   # sizes of every model
    python bench/bench_full_size.py --time pixart_sigma --resolution 256 --steps 2
    python bench/bench_full_size.py --time all --device cuda --dtype float16 --resolution 1024 --batch 4

The paper (arXiv 2410.18013) reports about 10 A100 GPU-days and $186 + $20 for the dataset.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch

# The job's generation settings (jobs/syn_pic.yaml): steps per image and whether CFG doubles the batch.
JOB_STEPS = {"sdxl": (50, True), "sd3_medium": (28, True), "pixart_sigma": (20, True),
             "stable_cascade_prior": (20, True), "stable_cascade_decoder": (10, False)}
PAPER_PROMPTS = 58_000


@dataclass
class Component:
    name: str
    build: Callable[[], torch.nn.Module]
    published: str  # the size its authors or model card state, to compare with the count


def clip_text(hidden, layers, heads, intermediate, projection=0, act="gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=intermediate, projection_dim=projection or hidden, hidden_act=act,
                         vocab_size=49408, max_position_embeddings=77)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def t5_encoder(d_model, d_ff, layers, heads, vocab=32128):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=heads, d_kv=64,
                                   vocab_size=vocab, feed_forward_proj="gated-gelu"))


def sd_vae(latent_channels=4, quant=True):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=1024, use_quant_conv=quant, use_post_quant_conv=quant)


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def sd3_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)


def pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16,
                                    in_channels=4, out_channels=8, patch_size=2, caption_channels=4096,
                                    cross_attention_dim=1152, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
                                    use_additional_conditions=False, interpolation_scale=2)


def cascade_prior():
    from diffusers import StableCascadeUNet

    # StableCascadeUNet's defaults are stage C (the prior), plus its CLIP inputs.
    return StableCascadeUNet(clip_text_in_channels=1280, clip_text_pooled_in_channels=1280,
                             clip_image_in_channels=768, switch_level=(False,))


def cascade_decoder():
    from diffusers import StableCascadeUNet

    block = ("SDCascadeResBlock", "SDCascadeTimestepBlock")
    return StableCascadeUNet(
        in_channels=4, out_channels=4, patch_size=2, conditioning_dim=1280, block_out_channels=(320, 640, 1280, 1280),
        num_attention_heads=(0, 0, 20, 20), down_num_layers_per_block=(2, 6, 28, 6),
        up_num_layers_per_block=(6, 28, 6, 2), down_blocks_repeat_mappers=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(3, 3, 2, 2),
        block_types_per_layer=(block, block, block + ("SDCascadeAttnBlock",), block + ("SDCascadeAttnBlock",)),
        clip_text_pooled_in_channels=1280, effnet_in_channels=16, pixel_mapper_in_channels=3,
        timestep_conditioning_type=("sca",), dropout=(0.0, 0.0, 0.1, 0.1), switch_level=None)


def paella_vq():
    from diffusers.pipelines.stable_cascade.pipeline_stable_cascade_combined import PaellaVQModel

    return PaellaVQModel()  # its defaults are Stage A


def clip_h():
    """OpenCLIP ViT-H-14 as transformers' CLIPModel: PickScore, and the towers of HPSv2.1 and MPS."""
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         hidden_act="gelu", vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                           patch_size=14, image_size=224, hidden_act="gelu"), projection_dim=1024))


def image_reward():
    """BLIP ViT-L/16 at 384 px + the BERT-base text encoder with cross-attention (ImageReward)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    class ImageRewardNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = BlipVisionModel(BlipVisionConfig(hidden_size=1024, num_hidden_layers=24,
                                                           num_attention_heads=16, intermediate_size=4096,
                                                           patch_size=16, image_size=384))
            self.text = BlipTextModel(BlipTextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024,
                                                     num_hidden_layers=12, num_attention_heads=12,
                                                     intermediate_size=3072), add_pooling_layer=False)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Linear(1024, 128),
                                           torch.nn.Linear(128, 64), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    return ImageRewardNet()


def vqascore():
    """CLIP-FlanT5-XL: CLIP ViT-L/14-336 vision tower + 2-layer projector + FlanT5-XL."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    class ClipFlanT5(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24,
                                                           num_attention_heads=16, intermediate_size=4096,
                                                           patch_size=14, image_size=336))
            self.projector = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(),
                                                 torch.nn.Linear(2048, 2048))
            self.t5 = T5ForConditionalGeneration(T5Config(d_model=2048, d_ff=5120, num_layers=24, num_heads=32,
                                                          d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu",
                                                          tie_word_embeddings=False))

    return ClipFlanT5()


CLIP_L = lambda projection=0: clip_text(768, 12, 12, 3072, projection, act="quick_gelu")  # noqa: E731
CLIP_G = lambda projection=0: clip_text(1280, 32, 20, 5120, projection)  # noqa: E731
T5_XXL = lambda: t5_encoder(4096, 10240, 24, 64)  # noqa: E731

# Each loaded model (one generator's pipeline, or one reward) and its components; dtype as jobs/syn_pic.yaml.
MODELS: dict[str, tuple[str, list[Component]]] = {
    "sdxl": ("float16", [Component("unet", sdxl_unet, "2.6B"), Component("text_encoder (CLIP-L)", CLIP_L, "123M"),
                         Component("text_encoder_2 (CLIP-G)", lambda: CLIP_G(1280), "695M"),
                         Component("vae", sd_vae, "84M")]),
    "sd3_medium": ("float16", [Component("transformer (MMDiT)", sd3_transformer, "2B"),
                               Component("text_encoder (CLIP-L)", lambda: CLIP_L(768), "124M"),
                               Component("text_encoder_2 (CLIP-G)", lambda: CLIP_G(1280), "695M"),
                               Component("text_encoder_3 (T5-XXL)", T5_XXL, "4.7B"),
                               Component("vae", lambda: sd_vae(16, quant=False), "84M")]),
    "pixart_sigma": ("float16", [Component("transformer (DiT-XL/2)", pixart_transformer, "0.6B"),
                                 Component("text_encoder (T5-XXL)", T5_XXL, "4.7B"),
                                 Component("vae", sd_vae, "84M")]),
    "stable_cascade": ("bfloat16", [Component("prior (stage C)", cascade_prior, "3.6B"),
                                    Component("decoder (stage B)", cascade_decoder, "1.5B"),
                                    Component("vqgan (stage A)", paella_vq, "20M"),
                                    Component("prior_text_encoder (CLIP-G)", lambda: CLIP_G(1280), "695M"),
                                    Component("text_encoder (CLIP-G)", lambda: CLIP_G(1280), "695M")]),
    "hpsv2 / pickscore (each)": ("float32", [Component("CLIP ViT-H-14", clip_h, "986M")]),
    "mps": ("float32", [Component("CLIP ViT-H-14 (+ fusion layers, not counted)", clip_h, "986M")]),
    "image_reward": ("float32", [Component("BLIP ViT-L/16 + BERT-base", image_reward, "~450M")]),
    "vqascore": ("bfloat16", [Component("CLIP-L/336 + FlanT5-XL (dtype auto: bf16 on CUDA)", vqascore, "~3.1B")]),
}
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def count_on_meta(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def sizes() -> list[dict]:
    rows = []
    for model, (dtype, components) in MODELS.items():
        total = 0
        for c in components:
            n = count_on_meta(c.build)
            total += n
            rows.append({"model": model, "component": c.name, "params": n, "published": c.published,
                         "dtype": dtype, "weights_gib": n * BYTES[dtype] / 2**30})
        rows.append({"model": model, "component": "TOTAL (one loaded copy)", "params": total, "published": "",
                     "dtype": dtype, "weights_gib": total * BYTES[dtype] / 2**30})
    return rows


def print_sizes(rows: list[dict]) -> None:
    print(f"{'model':<26} {'component':<46} {'params':>9} {'published':>9} {'dtype':>8} {'weights':>9}")
    for r in rows:
        print(f"{r['model']:<26} {r['component']:<46} {r['params'] / 1e9:>8.3f}B {r['published']:>9} "
              f"{r['dtype']:>8} {r['weights_gib']:>7.2f}GiB")


# Denoiser forwards: (build, latent channels, latent downscale, extra inputs for one forward).
def _denoiser_inputs(name: str, batch: int, resolution: int, device, dtype) -> tuple[torch.nn.Module, Callable]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    if name == "sdxl":
        net, s = sdxl_unet(), resolution // 8
        ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device, dtype=dtype)
        return net, lambda: net(rand(batch, 4, s, s), t, encoder_hidden_states=rand(batch, 77, 2048),
                                added_cond_kwargs={"text_embeds": rand(batch, 1280), "time_ids": ids})
    if name == "sd3_medium":
        net, s = sd3_transformer(), resolution // 8
        return net, lambda: net(hidden_states=rand(batch, 16, s, s), timestep=t,
                                encoder_hidden_states=rand(batch, 333, 4096), pooled_projections=rand(batch, 2048))
    if name == "pixart_sigma":
        net, s = pixart_transformer(), resolution // 8
        return net, lambda: net(rand(batch, 4, s, s), encoder_hidden_states=rand(batch, 300, 4096), timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if name == "stable_cascade_prior":
        net, s = cascade_prior(), -(-resolution // 42)  # the prior's compression (42.67): 24 latents at 1024 px
        ratio = torch.full((batch,), 0.5, device=device, dtype=dtype)
        return net, lambda: net(rand(batch, 16, s, s), ratio, clip_text_pooled=rand(batch, 1, 1280),
                                clip_text=rand(batch, 77, 1280), clip_img=rand(batch, 1, 768))
    if name == "stable_cascade_decoder":
        net, s = cascade_decoder(), resolution // 4  # stage B works at 1/4 of the image size (256 at 1024 px)
        ratio = torch.full((batch,), 0.5, device=device, dtype=dtype)
        p = -(-resolution // 42)
        return net, lambda: net(rand(batch, 4, s, s), ratio, clip_text_pooled=rand(batch, 1, 1280),
                                effnet=rand(batch, 16, p, p))
    raise ValueError(f"no denoiser timing for {name!r}; one of {sorted(JOB_STEPS)}")


def time_denoiser(name: str, batch: int, resolution: int, steps: int, device: str, dtype: str) -> dict:
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(0)
    net, forward = _denoiser_inputs(name, batch, resolution, device, torch_dtype)
    net = net.to(device=device, dtype=torch_dtype).eval()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        forward()  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            forward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    per_forward = (time.perf_counter() - start) / steps
    job_steps, cfg = JOB_STEPS[name]
    scale = (1024 / resolution) ** 2  # latent tokens at the job's 1024 px over those measured
    per_image = per_forward / batch * scale * job_steps * (2 if cfg else 1)
    out = {"denoiser": name, "device": device, "dtype": dtype, "batch": batch, "resolution": resolution,
           "seconds_per_forward": per_forward, "job_steps": job_steps, "cfg_doubles": cfg,
           "projected_seconds_per_1024px_image": per_image}
    if device.startswith("cuda"):
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del net
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time", default="", help=f"denoiser to time: one of {sorted(JOB_STEPS)} or 'all'")
    parser.add_argument("--resolution", type=int, default=256, help="image size timed (the job uses 1024)")
    parser.add_argument("--steps", type=int, default=2, help="timed forwards (after one warm-up)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(BYTES))
    parser.add_argument("--prompts", type=int, default=PAPER_PROMPTS, help="prompts in the projection")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = sizes()
    print_sizes(rows)
    result = {"sizes": rows, "timings": []}
    names = sorted(JOB_STEPS) if args.time == "all" else [n for n in args.time.split(",") if n]
    for name in names:
        t = time_denoiser(name, args.batch, args.resolution, args.steps, args.device, args.dtype)
        result["timings"].append(t)
        print(f"{name}: {t['seconds_per_forward']:.3f} s per forward (batch {args.batch}, {args.resolution} px, "
              f"{args.device} {args.dtype}); projected {t['projected_seconds_per_1024px_image']:.1f} s of denoising "
              f"per 1024 px image ({t['job_steps']} steps{', CFG x2' if t['cfg_doubles'] else ''}; "
              f"x{(1024 / args.resolution) ** 2:.0f} tokens: a lower bound for transformers)")
    if result["timings"]:
        hours = sum(t["projected_seconds_per_1024px_image"] for t in result["timings"]) * args.prompts / 3600
        print(f"projection: {hours:,.0f} device-hours of denoising for {args.prompts:,} prompts over the timed "
              f"denoisers on {args.device} (text encoders, VAE decodes and rewards not included). The paper: "
              "about 10 A100 GPU-days (240 h) and $186 + $20 for the whole dataset.")
        result["projected_denoising_hours"] = hours
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)


if __name__ == "__main__":
    main()
