"""The paper's models at full size, random weights, as per-image workloads (shared by the cost benches).

arXiv 2410.18013 builds Syn-Pic with four generators and five rewards (``jobs/syn_pic.yaml``) and trains
SDXL and SD3-Medium with RankDPO (``jobs/syn_pic_train_*.yaml``). Speed, memory and FLOPs do not depend on
weight values, so every model here is its released architecture, written out from the numbers of its
released ``config.json`` (no download), with random weights. Rewards are built by synpref's own reward
code where it has a builder (ImageReward, MPS's fusion layers, VQAScore's projector), so what is
counted is what synpref runs.

A :class:`Stage` is one component's forward as the job calls it, on a batch of ``b`` images: its inputs
have the shapes the pipeline passes at the job's resolution (1024 px), ``calls`` is how many such
forwards one image costs in the job (denoising steps, one VAE decode, ...), ``cfg`` says each call runs
the conditional and unconditional batch together (diffusers concatenates them: batch 2b). Training
stages are one image of a RankDPO step (``train=True``: forward with gradients, backward, with the
job's gradient checkpointing).

``build(stage, device)`` makes the module on ``device`` and ``forward_closure(stage, module, batch, device)``
one call of it: on ``meta`` nothing is allocated (``count_flops``), on ``cuda`` it is what
``bench/gpu_cost.py`` times. Needs torch, diffusers, transformers and open_clip only (synpref's reward
modules are imported from this checkout when synpref is not installed), so it runs on a bare GPU image.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

RESOLUTION = 1024  # every generator of jobs/syn_pic.yaml, and both training jobs
PAPER_PROMPTS = 58_000  # Pick-a-Pic v2's deduplicated train prompts (the paper: "about 58K")
TRAIN_STEPS, TRAIN_PROMPTS_PER_STEP, IMAGES_PER_PROMPT = 400, 1024, 4  # jobs/syn_pic_train_*.yaml
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def import_synpref():
    """``synpref`` from this checkout when it is not installed (a bare GPU machine): the package maps the
    repository's top-level folders (setup.py), so the repository root is a search location of ``synpref``."""
    try:
        import synpref  # noqa: F401
    except ModuleNotFoundError:
        import importlib.util

        root = Path(__file__).resolve().parent.parent
        spec = importlib.util.spec_from_file_location("synpref", root / "synpref" / "__init__.py",
                                                      submodule_search_locations=[str(root / "synpref"), str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["synpref"] = module
        spec.loader.exec_module(module)


# ---- architectures: the released config.json values -------------------------------------------------

def clip_text(hidden, layers, heads, intermediate, projection=0, act="gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=intermediate, projection_dim=projection or hidden, hidden_act=act,
                         vocab_size=49408, max_position_embeddings=77)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def clip_l(projection=0):
    return clip_text(768, 12, 12, 3072, projection, act="quick_gelu")


def clip_g(projection=1280):
    return clip_text(1280, 32, 20, 5120, projection)


def t5_xxl():
    """T5 v1.1 XXL encoder (SD3-Medium's text_encoder_3, PixArt-Sigma's text_encoder)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
                                   feed_forward_proj="gated-gelu"))


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


CLIP_H_CONFIG = dict(  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json (PickScore_v1 and MPS use it)
    text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     hidden_act="gelu", vocab_size=49408, max_position_embeddings=77),
    vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                       patch_size=14, image_size=224, hidden_act="gelu"), projection_dim=1024)


def clip_h():
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig(**CLIP_H_CONFIG))


def hps_open_clip():
    """HPSv2.1: open_clip's ViT-H-14, as synpref's hpsv2 reward builds it (no pretrained weights)."""
    import open_clip

    return open_clip.create_model("ViT-H-14", pretrained=None, device=torch.get_default_device())


def mps_modules():
    """MPS: CLIP-H plus the fusion layers of synpref's mps reward at the release's geometry (1024/16/64/4/4)."""
    import_synpref()
    from synpref.transforms.rewards.mps import _build_fusion

    root = torch.nn.Module()
    root.model, root.fusion = clip_h(), _build_fusion(dim=1024, heads=16, dim_head=64, ff_mult=4, layers=4)
    return root


# ImageReward's med_config.json (BLIP's BERT-base with cross-attention), as released by THUDM/ImageReward.
IMAGE_REWARD_MED = {"vocab_size": 30524, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-12, "add_cross_attention": True, "pad_token_id": 0}


def image_reward_net():
    import_synpref()
    from transformers import BlipVisionConfig

    from synpref.transforms.rewards.image_reward import VIT_L16, build_network, text_config_from_med

    vision = BlipVisionConfig(**VIT_L16)
    return build_network(vision, text_config_from_med(IMAGE_REWARD_MED, vision.hidden_size))


def vqascore_modules():
    """CLIP-FlanT5-XL as synpref's vqascore builds it: CLIP ViT-L/14-336, mlp2x_gelu projector, FlanT5-XL."""
    import_synpref()
    from transformers import CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    from synpref.transforms.rewards.vqascore import _projector_class

    root = torch.nn.Module()
    root.vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                                   intermediate_size=4096, patch_size=14, image_size=336,
                                                   projection_dim=768, hidden_act="quick_gelu"))
    root.projector = _projector_class()(1024, 2048)
    root.t5 = T5ForConditionalGeneration(T5Config(  # google/flan-t5-xl config.json
        d_model=2048, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32, d_kv=64, vocab_size=32128,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0))
    return root


# ---- stages: one component's forward as the job calls it ---------------------------------------------

@dataclass
class Stage:
    model: str  # the loaded model it belongs to: a generator or reward id of jobs/syn_pic.yaml, or train_<id>
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, int, Any], Callable[[], Any]]  # (module, batch, rand) -> forward closure
    calls: float = 1.0  # forwards per image in the job
    cfg: bool = False  # each forward carries the unconditional batch too (batch 2b)
    dtype: str = "float16"  # the job's dtype for this model
    train: bool = False  # forward with gradients + backward (RankDPO's policy pass)
    published: str = ""  # the size its authors or model card state, to compare with the count
    note: str = ""


class Rand:
    """Random inputs on a device in a dtype, from a fixed seed (meta: shapes only)."""

    def __init__(self, device, dtype, grad_first: bool = False):
        self.device, self.dtype = torch.device(device), dtype
        self.generator = torch.Generator().manual_seed(0)
        self.grad_first = grad_first  # the first tensor drawn (the noisy latent) takes the gradient

    def __call__(self, *shape, dtype=None):
        if self.device.type == "meta":
            t = torch.empty(*shape, device="meta", dtype=dtype or self.dtype)
        else:
            t = torch.randn(*shape, generator=self.generator).to(device=self.device, dtype=dtype or self.dtype)
        if self.grad_first:
            self.grad_first = False
            t.requires_grad_(True)
        return t

    def ids(self, b, n, vocab):
        if self.device.type == "meta":
            return torch.empty(b, n, device="meta", dtype=torch.long)
        return torch.randint(0, vocab, (b, n), generator=self.generator).to(self.device)

    def full(self, b, value):
        return torch.full((b,), value, device=self.device, dtype=self.dtype)


L = RESOLUTION // 8  # the SD VAEs' latent side at 1024 px (128)
CASCADE_C = -(-RESOLUTION // 42)  # stage C latent side: 1024 / 42.67 -> 24
CASCADE_B = 256  # stage B latent side at 1024 px (24 x 10.67, the decoder pipeline's latent_dim_scale)
VQA_TEXT_TOKENS = 64  # CLIP-FlanT5 encoder text around the image: system message, question, a typical prompt


def _text(net, b, r, n=77, vocab=49408, **kw):
    ids = r.ids(b, n, vocab)
    return lambda: net(input_ids=ids, **kw)


def _sdxl_unet(net, b, r):
    x, ctx, pooled = r(b, 4, L, L), r(b, 77, 2048), r(b, 1280)
    ids = r(b, 6)
    return lambda: net(x, r.full(b, 500.0), encoder_hidden_states=ctx,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})


def _sd3_transformer(net, b, r):
    x, ctx, pooled = r(b, 16, L, L), r(b, 333, 4096), r(b, 2048)  # 333 = 77 CLIP + 256 T5 tokens
    return lambda: net(hidden_states=x, timestep=r.full(b, 500.0), encoder_hidden_states=ctx, pooled_projections=pooled)


def _pixart(net, b, r):
    x, ctx = r(b, 4, L, L), r(b, 300, 4096)
    return lambda: net(x, encoder_hidden_states=ctx, timestep=r.full(b, 500.0),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _prior(net, b, r):
    x, pooled, ctx, img = r(b, 16, CASCADE_C, CASCADE_C), r(b, 1, 1280), r(b, 77, 1280), r(b, 1, 768)
    return lambda: net(x, r.full(b, 0.5), clip_text_pooled=pooled, clip_text=ctx, clip_img=img)


def _decoder(net, b, r):
    x, pooled, effnet = r(b, 4, CASCADE_B, CASCADE_B), r(b, 1, 1280), r(b, 16, CASCADE_C, CASCADE_C)
    return lambda: net(x, r.full(b, 0.5), clip_text_pooled=pooled, effnet=effnet)


def _vae_decode(channels):
    def make(net, b, r):
        z = r(b, channels, L, L)
        return lambda: net.decode(z)
    return make


def _vae_encode(net, b, r):
    x = r(b, 3, RESOLUTION, RESOLUTION)
    return lambda: net.encode(x)


def _vq_decode(net, b, r):
    z = r(b, 4, CASCADE_B, CASCADE_B)
    return lambda: net.decode(z, force_not_quantize=True)


def _hps(net, b, r):
    px, ids = r(b, 3, 224, 224), r.ids(b, 77, 49408)
    return lambda: (net.encode_image(px), net.encode_text(ids))


def _pickscore(net, b, r):
    px, ids = r(b, 3, 224, 224), r.ids(b, 77, 49408)
    return lambda: (net.get_image_features(pixel_values=px), net.get_text_features(input_ids=ids))


def _mps(net, b, r):
    px, ids, bias = r(b, 3, 224, 224), r.ids(b, 77, 49408), r(b, 257, 77)

    def forward():  # synpref's MPS.score_preprocessed, the condition tokens aside (once per load)
        clip = net.model
        text = clip.text_projection(clip.text_model(input_ids=ids).last_hidden_state)
        image = clip.visual_projection(clip.vision_model(pixel_values=px).last_hidden_state)
        return net.fusion(image, text, bias)
    return forward


def _image_reward(net, b, r):
    px, ids = r(b, 3, 224, 224), r.ids(b, 35, 30522)

    def forward():  # synpref's ImageReward._score; its masks are all ones here, the same as none (and no
        # mask means no data-dependent check on the meta device)
        image = net["vision"](pixel_values=px).last_hidden_state
        hidden = net["text"](input_ids=ids, encoder_hidden_states=image).last_hidden_state
        return net["head"](hidden[:, 0, :].float())
    return forward


def _vqascore(net, b, r):
    px, ids = r(b, 3, 336, 336), r.ids(b, VQA_TEXT_TOKENS, 32100)
    answer = r.ids(b, 2, 32100)  # "Yes" + </s>

    def forward():  # synpref's VQAScore._score: penultimate CLIP layer's patch tokens, projected, in the T5 input
        hidden = net.vision(pixel_values=px, output_hidden_states=True).hidden_states
        image = net.projector(hidden[-2][:, 1:])
        embeds = torch.cat([net.t5.get_input_embeddings()(ids), image.to(net.t5.dtype)], dim=1)
        return net.t5(inputs_embeds=embeds, decoder_input_ids=answer).logits  # unpadded: no mask needed
    return forward


# The job's settings (jobs/syn_pic.yaml). Text encoders run once per prompt for the prompt and, with CFG,
# once more for the empty negative prompt, except SDXL (force_zeros_for_empty_prompt: zeros, no encoding).
GENERATION: list[Stage] = [
    Stage("sdxl", "text_encoder (CLIP-L)", clip_l, _text, published="123M"),
    Stage("sdxl", "text_encoder_2 (CLIP-G)", clip_g, _text, published="695M"),
    Stage("sdxl", "unet", sdxl_unet, _sdxl_unet, calls=50, cfg=True, published="2.6B"),
    Stage("sdxl", "vae decode", sd_vae, _vae_decode(4), published="84M"),
    Stage("sd3_medium", "text_encoder (CLIP-L)", lambda: clip_l(768), _text, calls=2, published="124M"),
    Stage("sd3_medium", "text_encoder_2 (CLIP-G)", clip_g, _text, calls=2, published="695M"),
    Stage("sd3_medium", "text_encoder_3 (T5-XXL)", t5_xxl, lambda n, b, r: _text(n, b, r, 256, 32128), calls=2,
          published="4.7B"),
    Stage("sd3_medium", "transformer (MMDiT)", sd3_transformer, _sd3_transformer, calls=28, cfg=True, published="2B"),
    Stage("sd3_medium", "vae decode", lambda: sd_vae(16, quant=False), _vae_decode(16), published="84M"),
    Stage("pixart_sigma", "text_encoder (T5-XXL)", t5_xxl, lambda n, b, r: _text(n, b, r, 300, 32128), calls=2,
          published="4.7B"),
    Stage("pixart_sigma", "transformer (DiT-XL/2)", pixart_transformer, _pixart, calls=20, cfg=True,
          published="0.6B"),
    Stage("pixart_sigma", "vae decode", sd_vae, _vae_decode(4), published="84M"),
    Stage("stable_cascade", "prior_text_encoder (CLIP-G)", clip_g, _text, calls=2, dtype="bfloat16", published="695M"),
    Stage("stable_cascade", "prior (stage C)", cascade_prior, _prior, calls=20, cfg=True, dtype="bfloat16",
          published="3.6B"),
    Stage("stable_cascade", "text_encoder (CLIP-G)", clip_g, _text, dtype="bfloat16", published="695M"),
    Stage("stable_cascade", "decoder (stage B)", cascade_decoder, _decoder, calls=10, dtype="bfloat16",
          published="1.5B", note="decoder guidance 0: no CFG"),
    Stage("stable_cascade", "vqgan decode (stage A)", paella_vq, _vq_decode, dtype="bfloat16", published="20M"),
]

# One image (of a prompt's candidates) per forward; synpref encodes the prompt with each image.
REWARDS: list[Stage] = [
    Stage("hpsv2", "open_clip ViT-H-14", hps_open_clip, _hps, dtype="float32", published="986M"),
    Stage("mps", "CLIP-H + fusion", mps_modules, _mps, dtype="float32", published="~1B"),
    Stage("pickscore", "CLIP-H", clip_h, _pickscore, dtype="float32", published="986M"),
    Stage("vqascore", "CLIP-L/336 + FlanT5-XL", vqascore_modules, _vqascore, dtype="bfloat16", published="~3.1B",
          note=f"encoder: 576 image + {VQA_TEXT_TOKENS} text tokens"),
    Stage("image_reward", "BLIP ViT-L/16 + BERT", image_reward_net, _image_reward, dtype="float32", published="~450M"),
]

# One image of a RankDPO step (jobs/syn_pic_train_*.yaml): the VAE encodes it (cache_latents is off), the
# reference (LoRA disabled) predicts without gradients, the policy predicts with gradients and backward
# runs through the frozen network to the LoRA weights, recomputing each checkpointed block (gradient
# checkpointing on). Text embeddings are cached: at most once per prompt, 4 images, so 1/4 per image.
TRAINING: list[Stage] = [
    Stage("train_sdxl", "text_encoder_2 (CLIP-G), cached", clip_g, _text, calls=0.25, dtype="bfloat16",
          note="CLIP-L left out: 0.003 TFLOP per image more"),
    Stage("train_sdxl", "vae encode", sd_vae, _vae_encode, dtype="bfloat16"),
    Stage("train_sdxl", "unet reference forward", sdxl_unet, _sdxl_unet, dtype="bfloat16"),
    Stage("train_sdxl", "unet policy forward + backward", sdxl_unet, _sdxl_unet, dtype="bfloat16", train=True),
    Stage("train_sd3_medium", "text_encoder_3 (T5-XXL), cached", t5_xxl, lambda n, b, r: _text(n, b, r, 256, 32128),
          calls=0.25, dtype="bfloat16", note="the CLIPs left out: 0.03 TFLOP per image more"),
    Stage("train_sd3_medium", "vae encode", lambda: sd_vae(16, quant=False), _vae_encode, dtype="bfloat16"),
    Stage("train_sd3_medium", "transformer reference forward", sd3_transformer, _sd3_transformer, dtype="bfloat16"),
    Stage("train_sd3_medium", "transformer policy forward + backward", sd3_transformer, _sd3_transformer,
          dtype="bfloat16", train=True),
]

ALL_STAGES = GENERATION + REWARDS + TRAINING


def images_per_model(model: str, prompts: int = PAPER_PROMPTS) -> int:
    """Images each loaded model processes in the recipe: one per prompt per generator; every candidate per
    reward (4 per prompt); prompts x 4 ranked images per step for training."""
    if model.startswith("train_"):
        return TRAIN_STEPS * TRAIN_PROMPTS_PER_STEP * IMAGES_PER_PROMPT
    if any(s.model == model for s in GENERATION):
        return prompts
    return prompts * len({s.model for s in GENERATION})


def build(stage: Stage, device, dtype: str | None = None) -> torch.nn.Module:
    """The stage's module on ``device`` in ``dtype`` (default the job's): constructed there (on a GPU the
    random initialisation runs there too), evaluation mode, weights frozen."""
    torch_dtype = getattr(torch, dtype or stage.dtype)
    with torch.device(device):
        net = stage.build()
    net = net.to(dtype=torch_dtype)
    net.requires_grad_(False)
    net.eval()
    if stage.train:
        net.train()
        if hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
    return net


def forward_closure(stage: Stage, net: torch.nn.Module, batch: int, device, dtype: str | None = None):
    """A closure running the stage once on ``batch`` images (2 x batch rows with CFG): no gradients, or
    forward + backward for a training stage (the input latents take the gradient; weights are frozen,
    as LoRA's base weights are)."""
    torch_dtype = getattr(torch, dtype or stage.dtype)
    rand = Rand(device, torch_dtype, grad_first=stage.train)
    run = stage.inputs(net, batch * (2 if stage.cfg else 1), rand)
    if not stage.train:
        def infer():
            with torch.no_grad():
                return run()
        return infer

    def train():
        with torch.enable_grad():
            out = run()
            sample = out[0] if isinstance(out, tuple) else out.sample
            sample.float().pow(2).mean().backward()
        return sample
    return train


def count_flops(stage: Stage, batch: int = 1) -> int:
    """FLOPs of one call of the stage on ``batch`` images (PyTorch's FlopCounterMode: matrix products,
    convolutions and attention, forward and backward), counted on the meta device: no memory, no compute."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build(stage, "meta")
    closure = forward_closure(stage, net, batch, "meta")
    with FlopCounterMode(display=False) as counter:
        closure()
    return int(counter.get_total_flops())


def count_params(stage: Stage) -> int:
    with torch.device("meta"):
        module = stage.build()
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


@contextlib.contextmanager
def quiet():
    """Silence diffusers' and transformers' info/warning chatter about dtype casts of random models."""
    import logging
    import warnings

    levels = {n: logging.getLogger(n).level for n in ("diffusers", "transformers")}
    for n in levels:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, level in levels.items():
                logging.getLogger(n).setLevel(level)
