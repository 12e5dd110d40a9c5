"""MPS "overall" (Zhang et al., CVPR 2024, Kwai-Kolors/MPS): multi-dimensional human preference score.

How it is built, its checkpoint format and how it was checked: docs/rewards.md, `mps`.
"""
from __future__ import annotations

import re
import sys
from typing import Hashable, Sequence

from .base import Reward, register_reward
from .clip_score import check_dtype, resolve_dtype
from .pickscore import HFClipProcessor
from ..model_io import local_copy, pick_device

if __name__ == "__main__":  # ``python -m ...rewards.mps convert``: the package import already registered this
    # module (runpy warns about that, harmlessly); run its CLI rather than define and register the reward twice
    from .mps import main as _main

    sys.exit(_main())

CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# the authors' condition sentence for the "overall" preference (README and eval scripts, verbatim)
CONDITION_OVERALL = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, "
                     "structure, instance, texture, quantity, attributes, position, number, location, word, things.")
BACKENDS = ("pil", "torchvision")

# release key (under ``cross_model.layers.<i>.``) -> this module's key (under ``fusion.blocks.<i>.``)
RELEASE_TO_MODULE = {
    "0.fn.norm.weight": "cross.norm_weight",
    "0.fn.norm.bias": "cross.norm_bias",  # a buffer (zeros) in the release, loaded as saved
    "0.fn.to_q.weight": "cross.to_q.weight",
    "0.fn.to_kv.weight": "cross.to_kv.weight",
    "0.fn.to_out.weight": "cross.to_out.weight",
    "0.fn.ff.0.weight": "cross.ff_in.weight",
    "0.fn.ff.2.weight": "cross.ff_out.weight",
    "1.fn.norm.weight": "self_attn.norm_weight",
    "1.fn.norm.bias": "self_attn.norm_bias",
    "1.fn.rotary_emb.inv_freq": "self_attn.inv_freq",
    "1.fn.fused_attn_ff_proj.weight": "self_attn.fused_proj.weight",
    "1.fn.attn_out.weight": "self_attn.attn_out.weight",
    "1.fn.ff_out.1.weight": "self_attn.ff_out.weight",
}
# buffers that older transformers saved and 5.x recomputes (not parameters: safe to drop)
_IGNORED = re.compile(r"^model\.(text|vision)_model\.embeddings\.position_ids$")
_LAYER = re.compile(r"^cross_model\.layers\.(\d+)\.(.+)$")


def release_key_to_module_key(key: str) -> str | None:
    """The module key for a release key; ``None`` for keys with no counterpart (reported as unmatched)."""
    if key.startswith("model."):
        return key
    m = _LAYER.match(key)
    if m and m.group(2) in RELEASE_TO_MODULE:
        return f"fusion.blocks.{m.group(1)}.{RELEASE_TO_MODULE[m.group(2)]}"
    return None


def _fusion_geometry(state: dict) -> dict:
    """dim, heads, dim_head, ff_mult and layer count, read off the release's tensor shapes (1024/16/64/4/4)."""
    layers = sorted({int(m.group(1)) for m in map(_LAYER.match, state) if m})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"mps: checkpoint has no contiguous cross_model.layers.* (found {layers})")
    need = [f"cross_model.layers.0.0.fn.{name}.weight" for name in ("to_q", "to_kv", "ff.2")]
    if any(k not in state for k in need):
        raise ValueError(f"mps: checkpoint lacks {[k for k in need if k not in state]}")
    q, kv, ff_out = (state[k] for k in need)
    dim, inner, dim_head = q.shape[1], q.shape[0], kv.shape[0] // 2
    return {"dim": dim, "heads": inner // dim_head, "dim_head": dim_head, "ff_mult": ff_out.shape[1] // dim,
            "layers": len(layers)}


def _build_fusion(dim: int, heads: int, dim_head: int, ff_mult: int, layers: int):
    """The authors' ``Cross_model`` (our names; torch imported here so the registry import stays light)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    def layer_norm(x, weight, bias):
        return F.layer_norm(x, x.shape[-1:], weight, bias)

    def swiglu(x):
        value, gate = x.chunk(2, dim=-1)
        return value * F.silu(gate)

    def attend(q, k, v, bias=None):
        """q [B, H, N, D] (already scaled), shared k / v [B, M, D]; additive bias [B, N, M]."""
        logits = torch.einsum("bhnd,bmd->bhnm", q, k)
        if bias is not None:
            logits = logits + bias[:, None]
        logits = logits - logits.amax(dim=-1, keepdim=True)
        out = torch.einsum("bhnm,bmd->bhnd", logits.softmax(dim=-1), v)
        return out.transpose(1, 2).flatten(2)  # [B, N, H*D], heads outermost

    class CrossBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_weight = nn.Parameter(torch.ones(dim))
            self.register_buffer("norm_bias", torch.zeros(dim))
            self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
            self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
            self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
            self.ff_in = nn.Linear(dim, 2 * ff_mult * dim, bias=False)
            self.ff_out = nn.Linear(ff_mult * dim, dim, bias=False)

        def forward(self, x, context, bias):
            h = layer_norm(x, self.norm_weight, self.norm_bias)  # the context is not normalised
            q = self.to_q(h).unflatten(-1, (heads, dim_head)).transpose(1, 2) * dim_head ** -0.5
            k, v = self.to_kv(context).chunk(2, dim=-1)
            out = self.to_out(attend(q, k, v, bias)) + self.ff_out(swiglu(self.ff_in(h)))
            return x + out

    class ParallelBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm_weight = nn.Parameter(torch.ones(dim))
            self.register_buffer("norm_bias", torch.zeros(dim))
            self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim_head, 2).float() / dim_head)))
            self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
            self.fused_proj = nn.Linear(dim, sum(self.split), bias=False)
            self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
            self.ff_out = nn.Linear(ff_mult * dim, dim, bias=False)

        def rotate(self, t, angles):
            first, second = t.chunk(2, dim=-1)
            return t * angles.cos() + torch.cat((-second, first), dim=-1) * angles.sin()

        def forward(self, x):
            h = layer_norm(x, self.norm_weight, self.norm_bias)
            q, k, v, ff = self.fused_proj(h).split(self.split, dim=-1)
            pos = torch.arange(x.shape[1], device=x.device, dtype=self.inv_freq.dtype)
            angles = torch.outer(pos, self.inv_freq).repeat(1, 2)  # [N, dim_head]: (f, f) halves
            q = self.rotate(q.unflatten(-1, (heads, dim_head)).transpose(1, 2), angles) * dim_head ** -0.5
            k = self.rotate(k, angles)
            return x + self.attn_out(attend(q, k, v)) + self.ff_out(swiglu(ff))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.cross = CrossBlock()
            self.self_attn = ParallelBlock()

    class Fusion(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(layers))

        def forward(self, image_tokens, text_tokens, bias):
            x = image_tokens
            for block in self.blocks:
                x = block.self_attn(block.cross(x, text_tokens, bias))
            return x

    return Fusion()


def load_mps_modules(checkpoint: str, config: str, cache_dir: str = ""):
    """(CLIPModel, fusion) with every tensor of the release checkpoint loaded; unmatched keys fail in one line."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    from ..checkpoints import load_state_dict

    try:
        state = load_state_dict(checkpoint, cache_dir)
    except ValueError as e:
        raise ValueError(f"mps: {checkpoint}: not a state dict (the authors' MPS_overall_checkpoint.pth is a whole "
                         f"pickled module): convert it once with 'python -m synpref.transforms.rewards.mps convert "
                         f"IN.pth OUT.safetensors' on a trusted machine ({e})") from None
    state = {k.removeprefix("module."): v for k, v in state.items() if not _IGNORED.match(k.removeprefix("module."))}
    clip_config = CLIPConfig.from_pretrained(local_copy(config, cache_dir), cache_dir=cache_dir or None)
    geometry = _fusion_geometry(state)
    if geometry["dim"] != clip_config.projection_dim:
        raise ValueError(f"mps: fusion width {geometry['dim']} != CLIP projection_dim {clip_config.projection_dim}")
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # every parameter is overwritten below
        clip = CLIPModel(clip_config)
    root = torch.nn.Module()
    root.model, root.fusion = clip, _build_fusion(**geometry)

    mapped, unexpected = {}, []
    for key, value in state.items():
        target = release_key_to_module_key(key)
        (unexpected.append(key) if target is None else mapped.__setitem__(target, value))
    expected = root.state_dict()
    unexpected += [k for k in mapped if k not in expected]
    missing = [k for k in expected if k not in mapped]
    bad_shape = [f"{k} {tuple(mapped[k].shape)}!={tuple(v.shape)}" for k, v in expected.items()
                 if k in mapped and mapped[k].shape != v.shape]
    if missing or unexpected or bad_shape:
        def show(keys):
            return ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")
        raise ValueError(f"mps: {checkpoint} does not match the MPS architecture: missing [{show(missing)}]; "
                         f"unexpected [{show(unexpected)}]; wrong shape [{show(bad_shape)}]")
    root.load_state_dict({k: mapped[k] for k in expected}, strict=True)
    return clip.eval(), root.fusion.eval()


@register_reward("mps")
class MPS(HFClipProcessor, Reward):
    """Args:
    checkpoint: the MPS weights (required): a safetensors (or weights-only pickle) state dict with the
        release's keys: the ModelScope re-pack, or the output of this module's ``convert`` command.
    processor: tokenizer + image processor folder or hub id (default the LAION CLIP-H repo, as the authors).
    config: the CLIP ``config.json`` location (default: ``processor``, i.e. the LAION CLIP-H config).
    condition: the condition sentence (default the authors' "overall" one).
    mask_threshold: prompt tokens whose normalised condition similarity is not above it are masked
        (0.3, the authors' evaluation scripts; their training forward used 0.01).
    image_backend: ``pil`` (default, transformers 4's ``CLIPImageProcessor``, the authors') or ``torchvision``.
    dtype: ``float32`` (default); ``float16`` / ``bfloat16`` on CUDA only.
    """

    version = "2"  # 2: pixels rounded to float16 before the vision tower, as the authors' code does

    def __init__(self, checkpoint: str = "", processor: str = CLIP_H, config: str = "",
                 condition: str = CONDITION_OVERALL, mask_threshold: float = 0.3, image_backend: str = "pil",
                 device: str = "auto", dtype: str = "float32", cache_dir: str = ""):
        if not checkpoint:
            raise ValueError("mps: 'checkpoint' is required: a safetensors state dict of MPS_overall_checkpoint.pth "
                             "(convert it with 'python -m synpref.transforms.rewards.mps convert IN.pth OUT.safetensors')")
        if not processor:
            raise ValueError("mps: 'processor' must be set")
        if image_backend not in BACKENDS:
            raise ValueError(f"mps: image_backend must be one of {list(BACKENDS)}, got {image_backend!r}")
        if not condition.strip():
            raise ValueError("mps: 'condition' must be a non-empty sentence")
        check_dtype("mps", dtype)
        self.checkpoint, self.processor, self.config = checkpoint, processor, config
        self.condition, self.mask_threshold, self.image_backend = condition, float(mask_threshold), image_backend
        self.device, self.dtype, self.cache_dir = device, dtype, cache_dir
        self._clip = None
        self._image_processor = None

    def params(self):
        return {"checkpoint": self.checkpoint, "processor": self.processor, "config": self.config or self.processor,
                "condition": self.condition, "mask_threshold": self.mask_threshold,
                "image_backend": self.image_backend, "dtype": self.dtype}

    def files(self) -> dict[str, str]:
        files = {"checkpoint": self.checkpoint, "processor": self.processor}
        if self.config and self.config != self.processor:
            files["config"] = self.config
        return files

    def load(self) -> None:
        import torch

        device = pick_device(self.device)
        torch_dtype = resolve_dtype("mps", self.dtype, device)
        if self._image_processor is None:
            self._load_processor()
        clip, fusion = load_mps_modules(self.checkpoint, self.config or self.processor, self.cache_dir)
        self._scale = float(clip.logit_scale.detach().float().exp())  # before any cast to half precision
        self._max_len = min(self._tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
        self._device, self._dtype = device, torch_dtype
        self._clip = clip.to(device=device, dtype=torch_dtype)
        self._fusion = fusion.to(device=device, dtype=torch_dtype)
        with torch.no_grad():  # the condition sentence is fixed: its token features once per load
            self._condition_tokens = self._text_tokens([self.condition])[0][0]

    def _text_tokens(self, texts: Sequence[str]):
        """(projected features of every token [B, L, P], projected EOS feature [B, P]), padded to max_length
        with no attention mask, as the authors tokenise (the causal mask keeps tokens up to EOS exact)."""
        import torch

        ids = self._tokenizer(list(texts), max_length=self._max_len, padding="max_length", truncation=True,
                              return_tensors="pt")["input_ids"].to(self._device)
        tokens = self._clip.text_projection(self._clip.text_model(input_ids=ids).last_hidden_state)
        eos = tokens[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return tokens, eos

    def condition_bias(self, text_tokens):
        """Additive cross-attention bias [B, L]: 0 for prompt tokens kept, -inf for those masked."""
        import torch

        sim = torch.einsum("bld,cd->blc", text_tokens.float(), self._condition_tokens.float()).amax(dim=-1)
        sim = sim / sim.amax(dim=-1, keepdim=True)  # per prompt: the authors score one prompt per call
        return torch.where(sim > self.mask_threshold, 0.0, float("-inf"))

    def score_preprocessed(self, pixels, prompts: Sequence[str]) -> list[float]:
        import torch
        import torch.nn.functional as F

        if self._clip is None:
            self.load()
        with torch.no_grad():
            text_tokens, text_eos = self._text_tokens(prompts)
            bias = self.condition_bias(text_tokens)
            # the authors hand the tower ``pixel_values.half()``: the pixels are rounded to float16 first, in any
            # dtype (up to 1e-3 relative on a score otherwise, bench/parity/README.md)
            pixels = pixels.to(self._device).half().to(self._dtype)
            vision = self._clip.vision_model(pixel_values=pixels).last_hidden_state
            image_tokens = self._clip.visual_projection(vision)  # every token, before post_layernorm
            bias = bias[:, None, :].expand(-1, image_tokens.shape[1], -1).to(image_tokens.dtype)
            fused = self._fusion(image_tokens, text_tokens, bias)[:, 0]
            cos = (F.normalize(fused.float(), dim=-1) * F.normalize(text_eos.float(), dim=-1)).sum(-1)
            scores = self._scale * cos
        return [float(s) for s in scores.cpu()]


def convert_mps_module(src: str, dst: str) -> int:
    """One-time conversion of the authors' whole pickled module to a safetensors state dict.

    Un-pickles ``src`` with ``weights_only=False``, which runs code from the file: only on a trusted machine,
    only for the authors' release. Needs the authors' classes importable (their repository on PYTHONPATH).
    Returns the number of tensors written.
    """
    import torch
    from safetensors.torch import save_file

    obj = torch.load(src, map_location="cpu", weights_only=False)
    state = obj.state_dict() if hasattr(obj, "state_dict") else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{src}: expected a torch module or a dict of tensors, got {type(obj).__name__}")
    state = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(state, dst)
    return len(state)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m synpref.transforms.rewards.mps",
                                description="Convert the authors' pickled MPS module to safetensors (trusted input "
                                            "only: the pickle is fully un-pickled).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("src", help="MPS_overall_checkpoint.pth (a whole pickled module)")
    c.add_argument("dst", help="output .safetensors")
    a = p.parse_args(argv)
    try:
        n = convert_mps_module(a.src, a.dst)
    except ModuleNotFoundError as e:
        print(f"convert: {e}: put the authors' repository (github.com/Kwai-Kolors/MPS) on PYTHONPATH", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} tensors to {a.dst}")
    return 0

