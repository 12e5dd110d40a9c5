"""Hugging Face ``datasets`` features for the shards.

``datasets``' WebDataset loader infers columns from the first five samples and
refuses samples whose files differ. Ranked samples hold k images and k varies
(dropped candidates), so pass these features explicitly::

    load_dataset("webdataset", data_files=..., features=ranked_features(rewards, max_candidates))

Missing ``img{i}.png`` columns then read as None. The manifest records
``rewards`` and ``max_candidates``; ``features_from_manifest`` does it for you.
"""
from __future__ import annotations

import dataclasses
import typing

import datasets

from .records import Lineage

_VALUE = {str: "string", int: "int64", float: "float64"}


def _lineage_struct() -> dict:
    hints = typing.get_type_hints(Lineage)
    # call_args differ per pipeline (names and value types): one JSON value, not a fixed struct.
    return {f.name: datasets.Json() if typing.get_origin(hints[f.name]) is dict else datasets.Value(_VALUE[hints[f.name]])
            for f in dataclasses.fields(Lineage)}


def _candidate_struct(rewards: list[str]) -> dict:
    return {
        "candidate_id": datasets.Value("string"), "image": datasets.Value("string"),
        "rank": datasets.Value("int64"), "phi": datasets.Value("float64"),
        "scores": {r: datasets.Value("float64") for r in rewards}, "lineage": _lineage_struct(),
    }


def _common(rewards: list[str]) -> dict:
    return {"prompt_id": datasets.Value("string"), "prompt": datasets.Value("string"),
            "category": datasets.Value("string"), "aggregator": datasets.Value("string"),
            "rewards": datasets.List(datasets.Value("string")),
            "reward_info": {r: {"version": datasets.Value("string"), "fingerprint": datasets.Value("string")}
                            for r in rewards}}


_KEYS = {"__key__": datasets.Value("string"), "__url__": datasets.Value("string")}


def ranked_features(rewards: list[str], max_candidates: int, ext: str = "png") -> datasets.Features:
    meta = {**_common(rewards), "candidates": datasets.List(_candidate_struct(rewards))}
    images = {f"img{i}.{ext}": datasets.Image() for i in range(max_candidates)}
    return datasets.Features({**images, "json": meta, **_KEYS})


def pair_features(rewards: list[str], ext: str = "png") -> datasets.Features:
    meta = {**_common(rewards), "agreement": datasets.Value("float64"),
            "winner": _candidate_struct(rewards), "loser": _candidate_struct(rewards)}
    return datasets.Features({f"win.{ext}": datasets.Image(), f"lose.{ext}": datasets.Image(), "json": meta, **_KEYS})


def features_from_manifest(manifest: dict, layout: str = "ranked") -> datasets.Features:
    rewards = [r["name"] for r in manifest["rewards"]]
    # output.image_format (png when absent: older manifests) names the image members: jpeg -> .jpg
    fmt = ((manifest.get("config") or {}).get("output") or {}).get("image_format", "png")
    ext = {"jpeg": "jpg"}.get(fmt, fmt)
    if layout == "ranked":
        return ranked_features(rewards, manifest["max_candidates"], ext)
    if layout == "pairs":
        return pair_features(rewards, ext)
    raise ValueError(f"layout must be 'ranked' or 'pairs', got {layout!r}")
