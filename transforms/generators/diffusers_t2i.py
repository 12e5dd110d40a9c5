"""Any diffusers text-to-image pipeline loaded with ``DiffusionPipeline.from_pretrained``.

The call's arguments come from ``pipeline_call.call_arguments`` (each family's own names,
every value resolved), and the lineage records them as passed, with the size the model
actually generated at when the pipeline resizes its output.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np

from ...core.fileio import looks_like_hub_id
from ...schemas.records import Lineage
from ..model_io import local_copy, pick_device

from .base import Generator, register_generator
from .pipeline_call import call_arguments, connected_models, read_model_index, resizes_output
from .weights import denoiser_component, denoiser_folder, lora_file

log = logging.getLogger(__name__)

# Where diffusers (0.36 and later) defines Stable Cascade's VQ-GAN: under its deprecated Wuerstchen pipelines.
PAELLA_MODULE = "diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model"


def loadable_location(location: str, revision: str = "") -> str:
    """``location``, or a folder beside it that diffusers can load when its ``model_index.json`` cannot be.

    Stable Cascade's VQ-GAN (``PaellaVQModel``) now lives in ``PAELLA_MODULE``. Folders saved while it
    lived in ``diffusers.pipelines.wuerstchen`` name it ``["wuerstchen", "PaellaVQModel"]``, and diffusers'
    own ``save_pretrained`` (0.42) writes ``["diffusers", "PaellaVQModel"]``; ``from_pretrained`` resolves
    neither (and checks the entry even for a component passed in). Such a folder is loaded through a
    shadow folder: links to its files and a copy of the index whose entry names the module. The model's
    own files are never changed.
    """
    index = read_model_index(location, revision) or {}
    stale = {name for name, entry in index.items() if isinstance(entry, list) and len(entry) == 2
             and entry[1] == "PaellaVQModel" and entry[0] != PAELLA_MODULE}
    if not stale:
        return location
    import diffusers.pipelines.stable_cascade.pipeline_stable_cascade_combined  # noqa: F401 (puts PAELLA_MODULE in sys.modules)

    folder = location
    if looks_like_hub_id(location):
        import diffusers

        folder = diffusers.DiffusionPipeline.download(location, revision=revision or None)  # what loading fetches
    folder = os.path.abspath(folder)
    fixed = {**index, **{name: [PAELLA_MODULE, "PaellaVQModel"] for name in stale}}
    key = hashlib.sha256(f"{folder}\n{json.dumps(fixed, sort_keys=True)}".encode()).hexdigest()[:16]
    shadow = os.path.join(tempfile.gettempdir(), "synpref-loadable", key)
    if not os.path.exists(shadow):
        tmp = f"{shadow}.partial-{os.getpid()}"
        os.makedirs(tmp)
        for entry in os.listdir(folder):
            if entry != "model_index.json":
                os.symlink(os.path.join(folder, entry), os.path.join(tmp, entry))
        with open(os.path.join(tmp, "model_index.json"), "w", encoding="utf-8") as f:
            json.dump(fixed, f, indent=2, sort_keys=True)
        try:
            os.replace(tmp, shadow)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("loading %s through %s (Stable Cascade VQ-GAN entry fixed in model_index.json)", location, shadow)
    return shadow


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
        location = local_copy(c.model, c.cache_dir)
        loadable = loadable_location(location, c.revision)
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            loadable, revision=(c.revision or None) if loadable == location else None, torch_dtype=dtype, **extra)
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
        self.call_args = call_arguments(c, type(pipe))
        self.generated_size = (c.height, c.width)
        self._resizes = resizes_output(type(pipe), self.call_args)
        if self._resizes:
            # Observe the size the VAE decodes at (the binned size), before the pipeline resizes back.
            self.generated_size = (0, 0)  # unknown until the first call
            decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
            if decoder is None:
                raise ValueError(f"generator {c.id}: {type(pipe).__name__} resizes its output but has no "
                                 "vae.decoder to observe the generated size")
            decoder.register_forward_hook(self._record_decoded_size)

    def files(self) -> dict[str, str]:
        """The model, and any pipeline diffusers loads with it from another repository (Stable Cascade's prior)."""
        c = self.config
        out = {"model": c.model}
        for i, repo in enumerate(connected_models(c.model, c.revision)):
            out[f"connected pipeline{'' if i == 0 else f' {i + 1}'} (model card)"] = repo
        if c.lora:
            out["lora"] = lora_file(c.lora)
        if c.denoiser:
            out["denoiser"] = c.denoiser
        return out

    def _record_decoded_size(self, module, inputs, output) -> None:
        sample = output[0] if isinstance(output, tuple) else output
        self.generated_size = (int(sample.shape[-2]), int(sample.shape[-1]))

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[np.ndarray]:
        import torch

        kwargs = dict(self.call_args)
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
        out = self.pipe(
            prompt=list(prompts),
            generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
            output_type="np",
            **kwargs,
        )
        return [np.asarray(im, dtype=np.float32) for im in out.images]

    def lineage(self, seed: int) -> Lineage:
        """What the last ``generate`` call did for ``seed`` (all images of one call share the settings)."""
        c, args = self.config, self.call_args
        # Two-stage pipelines have no guidance_scale: the decoder's goes in the top-level field.
        guidance = args.get("guidance_scale", args.get("decoder_guidance_scale", 0.0))
        return Lineage(
            generator_id=c.id, model=c.model, revision=c.revision or "main",
            pipeline_class=type(self.pipe).__name__, scheduler=type(self.pipe.scheduler).__name__,
            num_inference_steps=int(args["num_inference_steps"]), guidance_scale=float(guidance),
            height=c.height, width=c.width, dtype=str(self.dtype).replace("torch.", ""), seed=int(seed),
            negative_prompt=c.negative_prompt, call_args=dict(args),
            generated_height=self.generated_size[0], generated_width=self.generated_size[1])
