"""Checks a training run before any model loads: a bad config fails in a second, with one line.

``preflight_train(config)`` raises ``ValueError`` / ``FileNotFoundError`` whose message is a single
line naming the offending key, entry, file or folder, so ``synpref train`` can print it and exit 2
(as ``synpref build`` does with its own ``preflight``). It reads only shard listings, parquet footers and
the first tar header, and writes one probe file into ``output_dir`` (created if missing, probe removed).
"""
from __future__ import annotations

import os
import tarfile

import fsspec

from ..core.errors import one_line
from ..core.fileio import check_writable, looks_like_hub_id
from .data import READERS, resolve_shards

_OFFLINE = ("1", "true", "yes", "on")


def preflight_train(config) -> list[str]:
    """Validate ``config`` (a ``TrainConfig``) before the first step; return the resolved shard list.

    Checks, in order: ``eval_rewards`` are registered rewards taking their params; ``max_steps >= 1``; ``data_format`` is known; every ``shards`` entry matches
    something and the list is not empty; ranked/pairs tars look like the layout ``data_format`` names
    (first sample of the first shard); every Pick-a-Pic parquet has ``caption``, ``jpg_0``, ``jpg_1``,
    ``label_0``; a local ``pretrained_model`` folder exists (a hub id must be cached when
    ``HF_HUB_OFFLINE`` is set); ``output_dir`` can be created and written (probe file via fsspec).

    Raises:
        ValueError: a bad value, a malformed input file or an unwritable ``output_dir`` (one line).
        FileNotFoundError: a shard entry matching nothing or a missing model folder (one line).
    """
    if config.eval_every:
        from ..transforms.rewards import check_rewards

        check_rewards(config.eval_rewards, "config.eval_rewards")
    max_steps = getattr(config, "max_steps", None)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    data_format = getattr(config, "data_format", "ranked")
    if data_format == "auto":
        data_format = detect_data_format(list(config.shards or []))
    if data_format not in READERS:
        raise ValueError(f"unknown data_format {data_format!r}; valid: {sorted(READERS)}")
    urls = _check_shards(list(config.shards or []), data_format)
    if getattr(config, "validation_shards", None):
        try:
            _check_shards(list(config.validation_shards), data_format)
        except (ValueError, FileNotFoundError) as exn:
            raise type(exn)(f"validation_{exn}") from None  # "shards: ..." -> "validation_shards: ..."
    _check_model(str(config.pretrained_model), getattr(config, "revision", None))
    init = getattr(config, "init_lora", None)
    if init and not os.path.isfile(os.path.join(os.path.expanduser(init), "pytorch_lora_weights.safetensors")):
        raise FileNotFoundError(f"init_lora: no pytorch_lora_weights.safetensors in {init!r}")
    check_writable(str(config.output_dir), "output_dir")
    if getattr(config, "resume_from_checkpoint", None):
        from .train import check_resume

        check_resume(resolve_data_format(config))  # a missing, unreadable or other-config checkpoint
    return urls


def detect_data_format(entries: list[str]) -> str:
    """``data_format: auto``: ``pickapic`` when the entries hold Parquet files and no tars; for tars, ``pairs``
    when the first shard's first sample has ``win``/``lose`` images, else ``ranked`` (whose layout check then
    names what the shard holds). Entries matching nothing give ``ranked`` (the shard check names them)."""
    try:
        urls = resolve_shards(entries, "tar")
    except (FileNotFoundError, OSError, ValueError):
        try:
            resolve_shards(entries, "parquet")
            return "pickapic"
        except (FileNotFoundError, OSError, ValueError):
            return "ranked"
    if all(u.endswith(".parquet") for u in urls):  # parquet files named one by one or by a glob
        return "pickapic"
    return "pairs" if _layout(_first_sample_members(urls[0]))[0] else "ranked"


def resolve_data_format(config):
    """``config`` with ``data_format: auto`` replaced by what ``detect_data_format`` finds (else unchanged)."""
    if config.data_format != "auto":
        return config
    return config.model_copy(update={"data_format": detect_data_format(list(config.shards))})


def _check_shards(entries: list[str], data_format: str) -> list[str]:
    if not entries:
        raise ValueError("shards is empty: give shard paths, globs, directories or URLs")
    ext = READERS[data_format].extension
    urls = []
    for entry in entries:  # one at a time, so the message names the entry
        try:
            urls += resolve_shards([entry], ext)
        except FileNotFoundError as exn:
            raise FileNotFoundError(f"shards: {one_line(exn)}") from None
        except (OSError, ValueError) as exn:
            raise ValueError(f"shards: cannot list {entry!r}: {one_line(exn)}") from None
    if not urls:
        raise ValueError(f"shards: {entries} matched no {ext} file")
    if data_format == "pickapic":
        rows = sum(_check_pickapic(url) for url in urls)
        if not rows:
            raise ValueError(f"shards: {entries} hold Pick-a-Pic parquet with no rows: nothing to train on")
    else:
        _check_tar_layout(urls[0], data_format)
    return urls


def _check_pickapic(url: str) -> int:
    """Refuse a parquet file without the Pick-a-Pic columns; return its row count (from the footer)."""
    import pyarrow.parquet as pq

    from ..formats.pickapic import PICKAPIC_COLUMNS

    try:
        with fsspec.open(url, "rb") as f:
            parquet = pq.ParquetFile(f)
            names, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
    except (OSError, ValueError) as exn:
        raise ValueError(f"shards: {url} is not a readable parquet file: {one_line(exn)}") from None
    missing = [c for c in PICKAPIC_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"shards: {url} is missing column(s) {missing}; data_format pickapic needs "
                         f"the Pick-a-Pic v2 columns {list(PICKAPIC_COLUMNS)}")
    return rows


def _first_sample_members(url: str, limit: int = 64) -> list[str]:
    """Member names of the first sample of a tar (stops at the first key change); [] if unreadable."""
    names: list[str] = []
    key = None
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                this_key = base.split(".", 1)[0]
                if key is not None and this_key != key:
                    break
                key = this_key
                names.append(base)
                if len(names) >= limit:
                    break
    except (OSError, tarfile.TarError, EOFError):
        return []  # the reader skips corrupt shards with a counted reason; not a config error
    return names


def _layout(names: list[str]) -> tuple[bool, bool]:
    """(looks like a pairs sample, looks like a ranked sample) from one sample's member names."""
    exts = ("png", "jpg", "webp")
    return (any(n.endswith((f".win.{e}", f".lose.{e}")) for n in names for e in exts),
            any(n.endswith(f".img0.{e}") for n in names for e in exts))


def _check_tar_layout(url: str, data_format: str) -> None:
    """Catch ranked/pairs mix-ups and shards of something else (a filter output, a web corpus) from the first
    sample, instead of skipping every sample as missing_image after the models have loaded."""
    names = _first_sample_members(url)
    is_pairs, is_ranked = _layout(names)
    if names and not is_pairs and not is_ranked:
        shown = ", ".join(names[:6])
        raise ValueError(f"shards: {url} holds neither ranked (img0.png, ...) nor pairs (win.png, lose.png) samples "
                         f"(first sample: {shown}); give the ranked/ or pairs/ folder of a synpref build")
    if data_format == "ranked" and is_pairs and not is_ranked:
        raise ValueError(f"shards: {url} holds pairs samples (win.png/lose.png) but data_format is 'ranked': "
                         "set data_format: pairs or point shards at the ranked/ folder")
    if data_format == "pairs" and is_ranked and not is_pairs:
        raise ValueError(f"shards: {url} holds ranked samples (img0.png, ...) but data_format is 'pairs': "
                         "set data_format: ranked or point shards at the pairs/ folder")


def _check_model(name: str, revision: str | None) -> None:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise FileNotFoundError(f"model folder {name!r} has no model_index.json: not a diffusers pipeline "
                                    "folder (pretrained_model)")
        from .families import family_for

        try:
            family_for(path)  # an unknown pipeline class: one line listing the families there are
        except (KeyError, TypeError, OSError, ValueError) as exn:  # unreadable JSON, no _class_name
            if isinstance(exn, ValueError) and "has no training family" in str(exn):
                raise
            raise ValueError(f"model folder {name!r}: unreadable model_index.json ({type(exn).__name__}: "
                             f"{one_line(exn)}) (pretrained_model)") from None
        return
    if os.path.exists(path):
        raise FileNotFoundError(f"model folder {name!r} is a file, not a diffusers model folder")
    if not looks_like_hub_id(name, bare_names=True):  # an absolute, ./relative or deeper path: only a folder can be meant
        raise FileNotFoundError(f"model folder {name!r} does not exist (pretrained_model)")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _OFFLINE and not _in_hub_cache(name, revision):
        raise FileNotFoundError(f"model folder {name!r} does not exist, and no hub model {name!r} is in the "
                                "local cache (HF_HUB_OFFLINE is set) (pretrained_model)")


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return True  # cannot tell: let the loader decide
    for filename in ("model_index.json", "unet/config.json", "transformer/config.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
                return True
        except Exception:  # an id the hub library refuses is not in the cache either
            return False
    return False


