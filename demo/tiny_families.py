"""Tiny random pipelines of every diffusers family synpref generates with, built offline from configs.

Each ``save_tiny_<family>(path)`` builds the family's real pipeline class from its real
component classes (a few thousand to a few hundred thousand random parameters), saves
it with ``save_pretrained`` and returns the folder, so tests and benches load it through
the same ``DiffusionPipeline.from_pretrained`` path a downloaded checkpoint takes.
Tokenizers are real tokenizers with tiny vocabularies: CLIP BPE from open_clip's bundled
vocabulary, T5 (Unigram) over letters, Gemma (BPE with byte fallback) over characters.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from ..demo.tiny_models import _write_clip_tokenizer_files, save_tiny_sd_pipeline
from ..transforms.generators.diffusers_t2i import PAELLA_MODULE


@functools.lru_cache(maxsize=1)
def _clip_tokenizer_files() -> str:
    """open_clip's vocabulary written once per process (a few seconds), removed at exit."""
    folder = tempfile.mkdtemp(prefix="synpref-tok-")
    atexit.register(shutil.rmtree, folder, True)
    _write_clip_tokenizer_files(Path(folder))
    return folder


def clip_tokenizer():
    """The 49408-token CLIP BPE tokenizer (open_clip's vocabulary), loaded with ``from_pretrained``."""
    from transformers import CLIPTokenizer

    # from_pretrained: transformers 5's CLIPTokenizer(vocab_file=...) ignores the files (see tiny_models).
    return CLIPTokenizer.from_pretrained(_clip_tokenizer_files(), pad_token="<|endoftext|>", model_max_length=77)


def clip_encoder(seed: int, projection: bool = True, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                         max_position_embeddings=77, projection_dim=hidden, hidden_act="gelu")
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def t5_tokenizer(model_max_length: int = 77):
    """A T5 (Unigram) tokenizer over letters: transformers 5 builds one from a vocabulary list, offline."""
    from transformers import T5TokenizerFast

    letters = string.ascii_lowercase
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in letters] + [("▁" + c, -4.0) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_encoder(seed: int, width: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=width, d_ff=37, d_kv=8, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8))


def gemma_tokenizer():
    """A Gemma tokenizer (BPE, byte fallback) over printable characters: Sana's tokenizer class, offline.

    Characters outside the vocabulary fall back to byte tokens ``<0x..>``, as in the real Gemma vocabulary.
    """
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for ch in "▁" + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(ch, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], model_max_length=300, padding_side="right")


def tiny_vae(seed: int = 0, **kw):
    """An AutoencoderKL with 4 levels (downsamples by 8, as SD/SDXL/SD3/FLUX/PixArt's VAEs do)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = {"latent_channels": 4, **kw}
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=32, sample_size=64, **kw)


def _save(pipe, path) -> str:
    pipe.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def save_tiny_sd(path, seed: int = 0) -> str:
    """Stable Diffusion 1.x (StableDiffusionPipeline)."""
    return save_tiny_sd_pipeline(path, seed=seed)


def save_tiny_sdxl(path, seed: int = 0) -> str:
    """SDXL (StableDiffusionXLPipeline): two CLIP encoders, a UNet with text-time conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + pooled(32)
        cross_attention_dim=64, norm_num_groups=32,  # 32 + 32: both encoders' hidden states
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet, vae=tiny_vae(seed), scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        text_encoder=clip_encoder(seed + 1, projection=False), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(seed + 2), tokenizer_2=clip_tokenizer(),
    )
    return _save(pipe, path)


def save_tiny_sd3(path, seed: int = 0) -> str:
    """SD3 (StableDiffusion3Pipeline): MMDiT, two CLIP encoders and T5, flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,  # = T5 width
        pooled_projection_dim=64,  # CLIP-L + CLIP-G projections
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                     use_post_quant_conv=False),
        text_encoder=clip_encoder(seed + 1), tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(seed + 2), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(seed + 3, width=64), tokenizer_3=t5_tokenizer(),
    )
    return _save(pipe, path)


def save_tiny_pixart_sigma(path, seed: int = 0) -> str:
    """PixArt-Sigma (PixArtSigmaPipeline): DiT with T5 cross-attention.

    ``sample_size=32`` latents make the pipeline's resolution binning use its 256-px aspect-ratio
    table (as 128 selects the 1024-px table of PixArt-Sigma-XL-2-1024-MS).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8, norm_num_groups=32,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    pipe = PixArtSigmaPipeline(transformer=transformer, vae=tiny_vae(seed), scheduler=DPMSolverMultistepScheduler(),
                               text_encoder=t5_encoder(seed + 1), tokenizer=t5_tokenizer(300))
    return _save(pipe, path)


def save_tiny_flux(path, seed: int = 0) -> str:
    """FLUX.1 (FluxPipeline): MMDiT with packed latents, CLIP pooled + T5 sequence, guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    vae = tiny_vae(seed, latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                   use_post_quant_conv=False)
    pipe = FluxPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                        text_encoder=clip_encoder(seed + 1, projection=False), tokenizer=clip_tokenizer(),
                        text_encoder_2=t5_encoder(seed + 2), tokenizer_2=t5_tokenizer(512))
    return _save(pipe, path)


def save_tiny_sana(path, seed: int = 0) -> str:
    """Sana (SanaPipeline): linear DiT, Gemma-2 text encoder, DC-AE (deep compression) autoencoder.

    The tiny DC-AE has two levels (downsamples by 2), so the tiny transformer's ``sample_size=16`` selects
    the pipeline's 512-px aspect-ratio table for resolution binning, as in Sana_600M/1600M_512px.
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=16,
        sample_size=16, patch_size=1)
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"),
                        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1],
                        downsample_block_type="conv", upsample_block_type="interpolate",
                        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407)
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=8, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
        num_key_value_heads=2, vocab_size=400, max_position_embeddings=512))
    pipe = SanaPipeline(transformer=transformer, vae=vae, scheduler=DPMSolverMultistepScheduler(flow_shift=3.0,
                        use_flow_sigmas=True, prediction_type="flow_prediction"),
                        text_encoder=text_encoder, tokenizer=gemma_tokenizer())
    return _save(pipe, path)


def save_tiny_stable_cascade(path, seed: int = 0, fix_index: bool = True) -> str:
    """Stable Cascade (StableCascadeCombinedPipeline): prior (stage C), decoder (stage B), Paella VQ-GAN (A).

    The tiny pipeline returns images of the requested size only from 128 px up (smaller sizes come back
    at 128 px or at a size rounded by its compression factors). ``fix_index=False`` keeps the
    ``model_index.json`` entry diffusers writes for the VQ-GAN, which it cannot load back (``fix_paella_entry``).
    """
    from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline, StableCascadeUNet
    from diffusers.pipelines.stable_cascade.pipeline_stable_cascade_combined import PaellaVQModel

    torch.manual_seed(seed)
    prior = StableCascadeUNet(
        conditioning_dim=32, block_out_channels=(16, 16), num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1), clip_image_in_channels=32,
        switch_level=(False,), clip_text_in_channels=32, clip_text_pooled_in_channels=32, dropout=(0.0, 0.0))
    torch.manual_seed(seed + 1)
    decoder = StableCascadeUNet(
        in_channels=4, out_channels=4, conditioning_dim=32, block_out_channels=(16, 16),
        num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1), up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),
                               ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")),
        clip_text_pooled_in_channels=32, effnet_in_channels=16, pixel_mapper_in_channels=3,
        timestep_conditioning_type=("sca",), dropout=(0.0, 0.0), switch_level=None, patch_size=2)
    torch.manual_seed(seed + 2)
    vqgan = PaellaVQModel(bottleneck_blocks=1, num_vq_embeddings=2, embed_dim=16, latent_channels=4)
    pipe = StableCascadeCombinedPipeline(
        tokenizer=clip_tokenizer(), text_encoder=clip_encoder(seed + 3), decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan, prior_prior=prior,
        prior_text_encoder=clip_encoder(seed + 4), prior_tokenizer=clip_tokenizer(),
        prior_scheduler=DDPMWuerstchenScheduler())
    out = _save(pipe, path)
    if fix_index:
        fix_paella_entry(out)
    return out


def fix_paella_entry(folder) -> bool:
    """Make a saved Stable Cascade folder loadable: diffusers 0.42 writes the VQ-GAN as
    ``["diffusers", "PaellaVQModel"]``, which ``from_pretrained`` cannot resolve (PaellaVQModel is not
    exported at the top of diffusers); the entry must name the class's module. True when it changed.
    (synpref's loader handles the unfixed entry too: ``diffusers_t2i.loadable_location``.)"""
    index = Path(folder) / "model_index.json"
    doc = json.loads(index.read_text())
    entry = doc.get("vqgan")
    if entry != ["diffusers", "PaellaVQModel"]:
        return False
    doc["vqgan"] = [PAELLA_MODULE, "PaellaVQModel"]
    index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return True


FAMILIES = {
    "sd": save_tiny_sd,
    "sdxl": save_tiny_sdxl,
    "sd3": save_tiny_sd3,
    "pixart_sigma": save_tiny_pixart_sigma,
    "stable_cascade": save_tiny_stable_cascade,
    "flux": save_tiny_flux,
    "sana": save_tiny_sana,
}


def save_tiny_family(family: str, path: str | os.PathLike, seed: int = 0) -> str:
    """Build and save the tiny pipeline of ``family`` (a key of ``FAMILIES``) to ``path``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    return FAMILIES[family](path, seed=seed)
