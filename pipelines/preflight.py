"""Checks that run before any pipeline work: a wrong path, column or folder fails now, in one line,
not on a worker an hour in (or as a 'done' build with nothing in it).

Every problem is raised as ``ValueError`` or ``FileNotFoundError`` with a one-line message that
says what is wrong and what to do; the CLI prints it and exits 2.
"""
from __future__ import annotations

import csv
import io

import fsspec

from ..core.errors import one_line
from ..core.fileio import check_writable
from ..schemas.config import BuildConfig, PromptsConfig
from ..transforms.model_io import check_location
from ..transforms.prompts import BUILTIN, _detect_format


def preflight(cfg: BuildConfig) -> None:
    """Check plug-ins, models, pipeline arguments, the prompt source and the output folders; cheap (no
    model loads), and writes only a probe file."""
    check_plugins(cfg)
    check_models(cfg)
    check_pipeline_arguments(cfg)
    check_prompt_source(cfg.prompts)
    check_writable(cfg.output.output_dir, "output.output_dir")
    if cfg.output.staging_dir:
        check_writable(cfg.output.staging_dir, "output.staging_dir")


def check_plugins(cfg: BuildConfig) -> None:
    """The plug-ins the config names (rewards, generator types, the aggregator) are registered, and take
    its options: reward params, a generator's own settings (a diffusers scheduler that exists), weights."""
    from ..transforms.aggregators import AGGREGATORS
    from ..transforms.generators import GENERATORS
    from ..transforms.rewards import check_rewards

    for i, g in enumerate(cfg.generators):
        GENERATORS.lookup(g.type, f"config.generators.{i}.type")(g).check()
    check_rewards(cfg.rewards)
    aggregator = AGGREGATORS.lookup(cfg.ranking.aggregator, "config.ranking.aggregator")
    if cfg.ranking.reward_weights and not aggregator.uses_config_weights:
        raise ValueError(f"config.ranking.aggregator {aggregator.name!r} estimates its own reward weights: "
                         "leave ranking.reward_weights empty")


def model_files(cfg: BuildConfig) -> list[tuple[str, str]]:
    """(what, location) for every model file or folder the job loads, hidden second downloads included
    (each reward's ``files()``: a PickScore processor, ImageReward's BERT tokenizer...)."""
    from ..transforms.generators import create_generator
    from ..transforms.rewards import create_reward

    out = [(f"generator {g.id}: {name}", loc) for g in cfg.generators
           for name, loc in create_generator(g).files().items() if loc]
    for r in cfg.rewards:
        out += [(f"reward {r.name}: {name}", loc) for name, loc in create_reward(r.name, r.params).files().items() if loc]
    return out


def check_models(cfg: BuildConfig) -> None:
    """Every model file or folder the job needs must be there; the first missing one is named. A generator's
    ``lora`` must fit its (local) model: checked from file headers and configs, no weights loaded."""
    from ..transforms.generators.weights import lora_misfit
    from ..transforms.model_io import is_remote, looks_like_hub_id

    for what, location in model_files(cfg):
        check_location(location, what)
    for g in cfg.generators:
        if g.lora and g.type == "diffusers" and not (looks_like_hub_id(g.model) or is_remote(g.model)):
            misfit = lora_misfit(g.model, g.lora, g.cache_dir)
            if misfit:
                raise ValueError(f"generator {g.id}: lora {g.lora} does not fit {g.model}: {misfit}")


def check_pipeline_arguments(cfg: BuildConfig) -> None:
    """Each diffusers generator's settings against its pipeline's ``__call__`` signature.

    The pipeline class comes from the model folder's ``model_index.json`` (``_class_name``), so no
    weights load; an argument the pipeline does not take is one line naming the pipeline and the
    arguments it accepts. A hub model whose index cannot be read here is checked when it loads.
    """
    from ..transforms.generators.pipeline_call import call_arguments, pipeline_class, read_model_index

    for g in cfg.generators:
        if g.type != "diffusers":
            continue
        index = read_model_index(g.model, g.revision)
        if index is not None:
            call_arguments(g, pipeline_class(index, f"generator {g.id}: {g.model}"))


def check_prompt_source(cfg: PromptsConfig) -> None:
    """The source must have a known format, exist, and (CSV, parquet) have ``text_field``.

    Reads only the CSV header line or the parquet schema; builtin and hf:// sources are not checked.
    """
    fmt = _detect_format(cfg)  # unknown extension -> ValueError asking for prompts.format
    src = cfg.source
    if src == BUILTIN or fmt == "hf" or src.startswith("hf://"):
        return
    try:
        fs, path = fsspec.core.url_to_fs(src)
    except ImportError as e:
        raise ValueError(f"prompts.source: {src} needs an fsspec filesystem that is not installed "
                         f"({one_line(e)})") from None
    if not fs.exists(path):
        raise FileNotFoundError(f"prompts.source: {src} does not exist; fix the path or use 'builtin'")
    if fs.isdir(path):
        raise ValueError(f"prompts.source: {src} is a folder; name a file, or set prompts.format: hf "
                         "for a Hugging Face dataset folder")
    if fmt == "csv":
        with fsspec.open(src, "rb", compression="infer") as f:
            text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline="")
            columns = next(csv.reader(text), [])
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with fsspec.open(src, "rb") as f:
                columns = pq.read_schema(f).names
        except Exception as e:  # ArrowInvalid and friends: not a parquet file at all
            raise ValueError(f"prompts.source: {src} is not a readable parquet file ({one_line(e)})") from None
    else:
        return  # txt has no columns; jsonl rows without the field are dropped as invalid_row
    if cfg.text_field not in columns:
        raise ValueError(f"prompts.source: {src} has no column {cfg.text_field!r} "
                         f"(columns: {', '.join(columns) or 'none'}); set prompts.text_field")


