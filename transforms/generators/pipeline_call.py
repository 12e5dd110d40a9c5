"""Which keyword arguments a diffusers pipeline's ``__call__`` gets, decided from its signature alone.

Families name their settings differently: Stable Cascade's combined pipeline takes
``prior_num_inference_steps`` / ``prior_guidance_scale`` for its prior and
``num_inference_steps`` / ``decoder_guidance_scale`` for its decoder, and no
``guidance_scale`` at all; PixArt and Sana take ``use_resolution_binning`` and
``max_sequence_length``. ``call_arguments`` turns a ``GeneratorConfig`` into exactly the
arguments one pipeline class accepts, with every value resolved (nothing is left to a
default the lineage would not see), and refuses, in one line naming the pipeline and
what it accepts, any setting the pipeline would not take. It needs only the class, so
the build's preflight runs it from ``model_index.json`` before any weights load.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Optional

from ...schemas.config import GeneratorConfig
from ..model_io import is_remote, looks_like_hub_id

log = logging.getLogger(__name__)

# Arguments synpref itself passes on every call (prompts, seeded generators, numpy output):
# never settable through ``call_args``.
FIXED = ("prompt", "generator", "output_type")
# Config fields that map onto ``__call__`` arguments of the same name where a pipeline takes them.
# ``num_inference_steps`` is the decoder's for two-stage pipelines (that is what Stable Cascade calls it).
FIELDS = ("height", "width", "num_inference_steps", "guidance_scale", "prior_num_inference_steps",
          "prior_guidance_scale", "decoder_guidance_scale", "negative_prompt")
# Arguments that would change what a call returns or how many images: not settable through ``call_args``.
NOT_SETTABLE = FIXED + FIELDS + ("num_images_per_prompt", "return_dict", "latents", "prompt_embeds",
                                  "negative_prompt_embeds", "callback", "callback_on_step_end")
# Values a family's model card recommends where they differ from its pipeline's defaults; a config
# field left null takes these, else the pipeline's own default (read from its signature).
# Stable Cascade (huggingface.co/stabilityai/stable-cascade): prior 20 steps at guidance 4.0,
# decoder 10 steps at guidance 0.0 (the pipeline defaults to 60 prior steps).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "StableCascadeCombinedPipeline": {"prior_num_inference_steps": 20, "prior_guidance_scale": 4.0,
                                      "decoder_guidance_scale": 0.0},
}


def accepted_arguments(pipeline_cls: type) -> dict[str, inspect.Parameter]:
    """The named parameters of ``pipeline_cls.__call__`` (``**kwargs`` catch-alls are not acceptance:
    SD's swallows deprecated callback arguments and ignores anything else)."""
    params = inspect.signature(pipeline_cls.__call__).parameters
    return {name: p for name, p in params.items() if name != "self"
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}


def _refuse(config: GeneratorConfig, pipeline_cls: type, what: str, hint: str = "") -> ValueError:
    accepted = ", ".join(accepted_arguments(pipeline_cls))
    return ValueError(f"generator {config.id}: {pipeline_cls.__name__} takes no {what}{hint}; "
                      f"its __call__ accepts: {accepted}")


def call_arguments(config: GeneratorConfig, pipeline_cls: type) -> dict[str, Any]:
    """Every keyword argument one call of ``pipeline_cls`` gets, except prompt, generator and output_type.

    Raises:
        ValueError: a config field or ``call_args`` entry the pipeline does not accept (one line
            naming the pipeline and the arguments it accepts), or a ``call_args`` key that synpref sets.
    """
    params = accepted_arguments(pipeline_cls)
    missing = [name for name in FIXED + ("height", "width", "num_inference_steps") if name not in params]
    if missing:
        raise _refuse(config, pipeline_cls, " and ".join(missing), " (not a text-to-image pipeline synpref can drive)")
    defaults = FAMILY_DEFAULTS.get(pipeline_cls.__name__, {})
    args: dict[str, Any] = {}
    for name in FIELDS:
        value = getattr(config, name)
        unset = value is None or (name == "negative_prompt" and value == "")
        if name not in params:
            if not unset:
                hint = ""
                if name == "guidance_scale" and "prior_guidance_scale" in params:
                    hint = " (set prior_guidance_scale and decoder_guidance_scale)"
                raise _refuse(config, pipeline_cls, repr(name), hint)
            continue
        if unset:
            if name == "negative_prompt":
                continue
            value = defaults.get(name, params[name].default)
            if value is inspect.Parameter.empty or value is None:
                continue  # the pipeline derives it (e.g. from the model config); nothing to record
        args[name] = value
    for name, value in config.call_args.items():
        if name in NOT_SETTABLE:
            field = f"generators[].{name}" if name in FIELDS else "synpref"
            raise ValueError(f"generator {config.id}: call_args.{name} is set by {field}, not call_args")
        if name not in params:
            raise _refuse(config, pipeline_cls, f"argument {name!r} (call_args)")
        args[name] = value
    return args


def resizes_output(pipeline_cls: type, args: dict[str, Any]) -> bool:
    """Whether the pipeline generates at a trained resolution and resizes to the requested size
    (PixArt's and Sana's ``use_resolution_binning``, on by default)."""
    params = accepted_arguments(pipeline_cls)
    if "use_resolution_binning" not in params:
        return False
    return bool(args.get("use_resolution_binning", params["use_resolution_binning"].default))


def read_model_index(location: str, revision: str = "") -> Optional[dict]:
    """A model folder's ``model_index.json`` (local, fsspec URL or hub id), or None when it cannot be read
    without loading the model (a hub id neither cached nor reachable)."""
    try:
        if looks_like_hub_id(location):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(location, "model_index.json", revision=revision or None)
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        if is_remote(location):
            import fsspec

            with fsspec.open(location.rstrip("/") + "/model_index.json", "r", encoding="utf-8") as f:
                return json.load(f)
        local = location[len("file://"):] if location.startswith("file://") else location
        with open(os.path.join(local, "model_index.json"), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except Exception as e:  # offline and uncached, no credentials...: the worker's load reports it
        log.warning("cannot read model_index.json of %s (%s: %s)", location, type(e).__name__, e)
        return None


def pipeline_class(index: dict, where: str) -> type:
    """The diffusers pipeline class a ``model_index.json`` names (``_class_name``)."""
    import diffusers

    name = index.get("_class_name", "")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name else None
    if not isinstance(cls, type):
        raise ValueError(f"{where}: model_index.json names pipeline {name!r}, which diffusers "
                         f"{diffusers.__version__} does not have")
    return cls


# Prior pipelines that diffusers loads from another repository named in a model's card (``prior:``) when a
# combined pipeline loads (``_load_connected_pipes``); used when that card cannot be read here (offline).
KNOWN_CONNECTED = {"stabilityai/stable-cascade": ("stabilityai/stable-cascade-prior",)}


def connected_models(location: str, revision: str = "") -> tuple[str, ...]:
    """The repositories diffusers loads alongside ``location`` (a combined pipeline's prior), so that
    ``check-models`` lists them: from the model card's ``prior:`` entry, else ``KNOWN_CONNECTED``."""
    index = read_model_index(location, revision)
    try:
        cls = pipeline_class(index, location) if index else None
    except ValueError:
        return ()
    if cls is not None and not getattr(cls, "_load_connected_pipes", False):
        return ()
    try:
        if looks_like_hub_id(location):
            from huggingface_hub import hf_hub_download

            card_path = hf_hub_download(location, "README.md", revision=revision or None)
        else:
            card_path = os.path.join(location, "README.md")
        from huggingface_hub import ModelCard

        prior = getattr(ModelCard.load(card_path).data, "prior", None) or []
        return tuple([prior] if isinstance(prior, str) else prior)
    except Exception:  # no card here (offline, or a local folder without one)
        return KNOWN_CONNECTED.get(location, ())
