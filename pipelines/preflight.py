"""Checks that run before any pipeline work: a wrong path, column or folder fails now, in one line,
not on a worker an hour in (or as a 'done' build with nothing in it).

Every problem is raised as ``ValueError`` or ``FileNotFoundError`` with a one-line message that
says what is wrong and what to do; the CLI prints it and exits 2.
"""
from __future__ import annotations

import csv
import io
import os
import uuid

import fsspec

from synpref.schemas.config import BuildConfig, PromptsConfig
from synpref.transforms.model_io import check_location
from synpref.transforms.prompts import BUILTIN, _detect_format


def preflight(cfg: BuildConfig) -> None:
    """Check models, pipeline arguments, the prompt source and the output folders; cheap (no model
    loads), and writes only a probe file."""
    check_models(cfg)
    check_pipeline_arguments(cfg)
    check_prompt_source(cfg.prompts)
    check_writable(cfg.output.output_dir, "output.output_dir")
    if cfg.output.staging_dir:
        check_writable(cfg.output.staging_dir, "output.staging_dir")


def model_files(cfg: BuildConfig) -> list[tuple[str, str]]:
    """(what, location) for every model file or folder the job loads, hidden second downloads included
    (each reward's ``files()``: a PickScore processor, ImageReward's BERT tokenizer...)."""
    from synpref.transforms.generators import create_generator
    from synpref.transforms.rewards import create_reward

    out = [(f"generator {g.id}: {name}", loc) for g in cfg.generators
           for name, loc in create_generator(g).files().items() if loc]
    for r in cfg.rewards:
        out += [(f"reward {r.name}: {name}", loc) for name, loc in create_reward(r.name, r.params).files().items() if loc]
    return out


def check_models(cfg: BuildConfig) -> None:
    """Every model file or folder the job needs must be there; the first missing one is named."""
    for what, location in model_files(cfg):
        check_location(location, what)


def check_pipeline_arguments(cfg: BuildConfig) -> None:
    """Each diffusers generator's settings against its pipeline's ``__call__`` signature.

    The pipeline class comes from the model folder's ``model_index.json`` (``_class_name``), so no
    weights load; an argument the pipeline does not take is one line naming the pipeline and the
    arguments it accepts. A hub model whose index cannot be read here is checked when it loads.
    """
    from synpref.transforms.generators.pipeline_call import call_arguments, pipeline_class, read_model_index

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
                         f"({_one_line(e)})") from None
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
            raise ValueError(f"prompts.source: {src} is not a readable parquet file ({_one_line(e)})") from None
    else:
        return  # txt has no columns; jsonl rows without the field are dropped as invalid_row
    if cfg.text_field not in columns:
        raise ValueError(f"prompts.source: {src} has no column {cfg.text_field!r} "
                         f"(columns: {', '.join(columns) or 'none'}); set prompts.text_field")


def check_writable(url: str, what: str) -> None:
    """Create the folder and write + remove a probe file with fsspec (local, gs://, s3:// alike)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)  # inside: a missing gcsfs/s3fs is an ImportError
        probe = f"{path.rstrip('/')}/.synpref-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except Exception as e:  # any failure here (permissions, a file in the way, credentials) means no output
        raise ValueError(f"{what}: cannot create or write {url} ({type(e).__name__}: {_one_line(e)}); "
                         "choose a folder you can write to") from None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
