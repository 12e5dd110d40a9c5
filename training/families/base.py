"""What differs between text-to-image model families, behind one small interface.

The training loop (``training/train.py``) is family-agnostic: it asks the family to encode
prompts and images, draw timesteps, noise the latents, name the regression target, run the
denoiser and save the LoRA. One file per family registers itself under the diffusers pipeline
class names it handles; ``family_for`` picks one from the model folder's ``model_index.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from ...core.registry import Registry

FAMILIES = Registry("model family")


def register_family(*pipeline_classes: str):
    """Class decorator: register a family under the ``_class_name`` values of ``model_index.json`` it handles."""
    return FAMILIES.register(*pipeline_classes, attribute=None)


def available_families() -> list[str]:
    """Pipeline class names the trainer can train."""
    return FAMILIES.names()


def model_index(pretrained_model: str, revision: str | None = None) -> dict:
    """``model_index.json`` of a local diffusers folder or a hub id."""
    index = Path(pretrained_model) / "model_index.json"
    if not index.is_file():
        if Path(pretrained_model).exists():
            raise FileNotFoundError(f"{pretrained_model} has no model_index.json: give a diffusers pipeline folder")
        from huggingface_hub import hf_hub_download

        index = Path(hf_hub_download(pretrained_model, "model_index.json", revision=revision))
    return json.loads(index.read_text())


def pipeline_class_name(pretrained_model: str, revision: str | None = None) -> str:
    """``_class_name`` from ``model_index.json``: the key of the family registry."""
    return model_index(pretrained_model, revision)["_class_name"]


def family_for(pretrained_model: str, revision: str | None = None) -> type["ModelFamily"]:
    """The family class for a model folder or hub id.

    Raises:
        ValueError: the pipeline class has no family; the message lists the ones that do.
    """
    name = pipeline_class_name(pretrained_model, revision)
    if name not in FAMILIES:
        raise ValueError(
            f"{pretrained_model}: pipeline class {name!r} has no training family; "
            f"available: {available_families()} (add one under training/families/)"
        )
    return FAMILIES[name]


class ModelFamily:
    """Frozen pipeline parts plus the denoiser that carries the trainable LoRA adapter.

    Subclasses load their components in ``__init__`` and implement the hooks below. All
    per-prompt tensors have a leading dimension B (prompts); the loop expands them to N
    (images) with ``group``. Randomness comes only from the ``generator`` passed in, drawn
    in a fixed order (VAE sample, timesteps, noise), so a seed fixes the loss.

    Args:
        config: the ``TrainConfig``.
        device: where the models live.
        weight_dtype: dtype of the frozen weights (the LoRA always trains in fp32).
    """

    #: diffusers pipeline class whose ``save_lora_weights`` / ``load_lora_weights`` the LoRA file targets
    pipeline_class: ClassVar[str]
    #: attribute that holds the trainable denoiser, and the LoRA key prefix in the saved file
    denoiser_name: ClassVar[str] = "unet"
    #: module names the LoRA adapter wraps
    lora_target_modules: ClassVar[list[str]] = ["to_k", "to_q", "to_v", "to_out.0"]

    def __init__(self, config, device: torch.device | str = "cpu", weight_dtype: torch.dtype = torch.float32):
        self.config = config
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype

    # ---- the denoiser (may be wrapped by accelerate; adapters live on the unwrapped module)
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        setattr(self, self.denoiser_name, module)

    def _freeze(self, modules: list[torch.nn.Module], dtypes: list[torch.dtype] | None = None) -> None:
        for i, module in enumerate(modules):
            module.requires_grad_(False)
            module.to(self.device)
            dtype = dtypes[i] if dtypes else self.weight_dtype
            if dtype != torch.float32:
                module.to(dtype=dtype)
            module.eval()

    # ---- hooks
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors, each with leading dimension B = len(prompts); no gradient."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Pixels [N, 3, H, W] in [-1, 1] -> scaled latents [N, C, h, w] in ``weight_dtype``; no gradient."""
        raise NotImplementedError

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` training timesteps (one per prompt), on ``self.device``."""
        raise NotImplementedError

    def sample_noise(
        self, latents: torch.Tensor, group: torch.Tensor, n_prompts: int, shared: bool, generator: torch.Generator
    ) -> torch.Tensor:
        """Gaussian noise like ``latents``; with ``shared`` one draw per prompt for all its images."""
        noise = torch.randn((n_prompts if shared else len(latents), *latents.shape[1:]), generator=generator)
        noise = noise.to(latents.device, latents.dtype)
        return noise[group] if shared else noise  # [B, C, h, w] -> [N, C, h, w]

    def noisy_input(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's input x_t."""
        raise NotImplementedError

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser's output is regressed on."""
        raise NotImplementedError

    def loss_weight(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-image weight [N] of the squared error, or ``None`` for 1."""
        return None

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Run ``self.denoiser`` (trained or, with adapters disabled, the reference)."""
        raise NotImplementedError

    # ---- LoRA files
    def lora_layers(self, denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The adapter's weights in diffusers' key format (``denoiser`` unwrapped)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))

    def save_lora(self, output_dir: str | Path, denoiser: torch.nn.Module) -> None:
        """Write ``pytorch_lora_weights.safetensors``, loadable with the pipeline's ``load_lora_weights``.

        The adapter metadata stores ``lora_alpha``, so a reload scales the adapter as trained. The same
        weights give the same bytes: sets (``target_modules``) are written sorted (diffusers lists a set in
        iteration order, which changes with the interpreter's hash seed) and so are the file's metadata keys.
        """
        import diffusers

        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in denoiser.peft_config["default"].to_dict().items()}
        getattr(diffusers, self.pipeline_class).save_lora_weights(
            output_dir,
            safe_serialization=True,
            **{
                f"{self.denoiser_name}_lora_layers": self.lora_layers(denoiser),
                f"{self.denoiser_name}_lora_adapter_metadata": metadata,
            },
        )
        from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

        sort_safetensors_metadata(Path(output_dir) / LORA_WEIGHT_NAME_SAFE)

    def load_lora(self, input_dir: str | Path, denoiser: torch.nn.Module) -> None:
        """Load a file written by ``save_lora`` into the existing ``default`` adapter (checkpoint resume)."""
        from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        prefix = f"{self.denoiser_name}."
        state = load_file(str(Path(input_dir) / LORA_WEIGHT_NAME_SAFE))
        state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        result = set_peft_model_state_dict(denoiser, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{input_dir}: LoRA keys that match no adapter layer: {unexpected[:5]}")


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its ``__metadata__`` keys sorted, in place (same length).

    safetensors (0.8) keeps the metadata in a Rust ``HashMap``, whose order is random per process, so two
    saves of the same tensors with two metadata keys (diffusers writes ``format`` and
    ``lora_adapter_metadata``) differ in bytes. Tensors, offsets and data are untouched.
    """
    path = Path(path)
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if len(header.get("__metadata__") or {}) < 2:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # never: same entries, serde_json's compact form; leave the file valid as written
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data[:8] + text.ljust(size) + data[8 + size:])  # safetensors pads its header with spaces
    tmp.replace(path)
