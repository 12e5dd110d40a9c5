"""Any diffusers text-to-image pipeline loaded with ``DiffusionPipeline.from_pretrained``."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np

from ...schemas.records import Lineage
from ..model_io import local_copy, pick_device

from .base import Generator, register_generator
from .weights import denoiser_component, denoiser_folder, lora_file

log = logging.getLogger(__name__)


@register_generator("diffusers")
class DiffusersGenerator(Generator):
    """Seeds drive CPU ``torch.Generator``s, so a seed gives the same initial noise on any device."""

    def check(self) -> None:
        c = self.config
        if c.scheduler:
            import diffusers

            cls = getattr(diffusers, c.scheduler, None)
            if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
                raise ValueError(f"generator {c.id}: unknown diffusers scheduler {c.scheduler!r} "
                                 "(a scheduler class name, e.g. EulerDiscreteScheduler)")

    def load(self) -> None:
        import diffusers
        import torch

        c = self.config
        device = pick_device(c.device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("generator %s asked for %s but no GPU is visible: running on CPU", c.id, device)
            device = "cpu"
        dtype = getattr(torch, c.dtype)
        if device == "cpu" and dtype != torch.float32:
            log.warning("generator %s: %s on CPU is slow or unsupported; using float32", c.id, c.dtype)
            dtype = torch.float32
        extra = {}
        if c.denoiser:  # a fully fine-tuned unet/transformer replaces the model's own
            component, cls_name = denoiser_component(c.model, c.cache_dir)
            extra[component] = getattr(diffusers, cls_name).from_pretrained(
                denoiser_folder(c.denoiser, component), torch_dtype=dtype)
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            local_copy(c.model, c.cache_dir), revision=c.revision or None, torch_dtype=dtype, **extra)
        if c.lora:
            # Not fused: peft adds scale * B(A(x)) beside the untouched base weights, exactly as the trainer
            # computed it, and without rounding the merged weights in fp16/bf16.
            path = local_copy(lora_file(c.lora), c.cache_dir)  # folder + file name: the adapter metadata is read
            pipe.load_lora_weights(os.path.dirname(path) or ".", weight_name=os.path.basename(path))
        if c.scheduler:
            self.check()
            pipe.scheduler = getattr(diffusers, c.scheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.device, self.dtype = device, dtype

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        import torch

        c = self.config
        kwargs = {}
        if c.negative_prompt:
            kwargs["negative_prompt"] = [c.negative_prompt] * len(prompts)
        out = self.pipe(
            prompt=list(prompts),
            num_inference_steps=c.num_inference_steps,
            guidance_scale=c.guidance_scale,
            height=c.height,
            width=c.width,
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
            output_type="np",
            **kwargs,
        )
        return [np.asarray(im, dtype=np.float32) for im in out.images]

    def lineage(self, seed: int) -> Lineage:
        c = self.config
        return Lineage(
            generator_id=c.id, model=c.model, revision=c.revision or "main",
            pipeline_class=type(self.pipe).__name__, scheduler=type(self.pipe.scheduler).__name__,
            num_inference_steps=c.num_inference_steps, guidance_scale=float(c.guidance_scale),
            height=c.height, width=c.width, dtype=str(self.dtype).replace("torch.", ""), seed=int(seed),
            negative_prompt=c.negative_prompt)

    def files(self) -> dict[str, str]:
        c = self.config
        out = {"model": c.model}
        if c.lora:
            out["lora"] = lora_file(c.lora)
        if c.denoiser:
            out["denoiser"] = c.denoiser
        return out
