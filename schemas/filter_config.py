"""Config of ``synpref filter``: score an existing web image-text corpus with the build's rewards and filter it.

YAML -> frozen dataclasses with the same loader as the build (``from_dict``: unknown keys rejected,
``--set`` overrides), validated once before anything runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from synpref.schemas.config import (RewardConfig, ScoreThreshold, apply_overrides, check_thresholds, from_dict,
                                    load_yaml)
from synpref.transforms.imageio import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class ParquetInputConfig:
    """Column names of Parquet inputs (defaults: img2dataset's ``output_format: parquet``)."""

    image_column: str = "jpg"  # image bytes, or a Hugging Face Image struct {bytes, path}
    path_column: str = "path"  # image path (relative to the Parquet file) or URL, used where there are no bytes
    caption_column: str = "caption"
    key_column: str = "key"  # absent or null: <file stem>_<row number>
    batch_rows: int = 256  # rows read from the table at a time
    # folders or URL prefixes, besides the Parquet file's own folder, that the path column may point into;
    # any other path (../x, /etc/passwd, another URL) is dropped as path_outside_corpus
    allowed_roots: tuple[str, ...] = ()


@dataclass(frozen=True)
class CorpusInputConfig:
    """Where the corpus is and how to read it (``transforms/corpus_sources.py``).

    ``source``: one or more folders, globs or files; local or any fsspec URL. ``format``: ``auto`` tells it
    from the file names (``.tar``, ``.tar.gz``/``.tgz``: WebDataset shards in img2dataset's layout,
    ``<key>.jpg|png|webp``, ``<key>.txt``, ``<key>.json``; ``.parquet``: tables of image bytes or paths),
    and a folder holding tar shards is read as tars (img2dataset's per-shard Parquet beside them is
    metadata, not input); ``tar`` or ``parquet`` forces one.
    """

    source: tuple[str, ...] = ()
    format: str = "auto"
    parquet: ParquetInputConfig = ParquetInputConfig()
    max_pixels: int = DEFAULT_MAX_PIXELS  # images declaring more pixels are dropped as too_many_pixels
    batch_size: int = 16  # images per scoring call inside one shard
    max_caption_chars: int = 0  # 0: no limit; longer captions are dropped as caption_too_long
    # JPEGs decoded at 1/2..1/8 scale (libjpeg DCT scaling) when every reward first shrinks images to a
    # fixed size (CLIP-style preprocessing: clip_score, laion_aesthetic, image_reward, hpsv2, vqascore),
    # never below that size; scores move slightly. Otherwise full-size decoding (a warning says why).
    jpeg_draft: bool = False


@dataclass(frozen=True)
class TopFraction:
    """Keep the samples whose ``reward`` score is at or above the global (1 - ``fraction``) quantile."""

    reward: str
    fraction: float
    num_quantiles: int = 1001  # resolution of Beam's ApproximateQuantiles (exact on small corpora)


@dataclass(frozen=True)
class CorpusFilterConfig:
    """``mode: and`` keeps a sample that passes every criterion; ``or`` one that passes any.

    Exact duplicates (sha256 of the image bytes) are always removed first: the smallest key is kept.
    """

    thresholds: tuple[ScoreThreshold, ...] = ()
    top_fraction: Optional[TopFraction] = None
    mode: Literal["and", "or"] = "and"
    dedup: Literal["exact", "none"] = "exact"
    # Near duplicates: samples whose 64-bit perceptual hash (dHash) is within this many bits of a sample
    # with a smaller key are dropped (near_duplicate). -1: off. Runs after exact dedup, before the filters.
    near_duplicate_distance: int = -1


@dataclass(frozen=True)
class FilterOutputConfig:
    output_dir: str = "out/filter"
    samples_per_shard: int = 1000


@dataclass(frozen=True)
class FilterJobConfig:
    input: CorpusInputConfig
    rewards: tuple[RewardConfig, ...]
    filter: CorpusFilterConfig = CorpusFilterConfig()
    output: FilterOutputConfig = FilterOutputConfig()
    torch_threads: int = 1
    beam_options: tuple[str, ...] = ()

    def validate(self) -> "FilterJobConfig":
        from synpref.transforms.rewards import available_rewards, create_reward

        if not self.input.source:
            raise ValueError("input.source: give a folder, glob or list of .tar / .tar.gz shards or .parquet tables")
        from synpref.transforms.corpus_sources import available_sources

        if self.input.format != "auto" and self.input.format not in available_sources():
            raise ValueError(f"input.format must be auto or one of {available_sources()}, got {self.input.format!r}")
        pq_cfg = self.input.parquet
        if pq_cfg.batch_rows < 1:
            raise ValueError(f"input.parquet.batch_rows must be >= 1, got {pq_cfg.batch_rows}")
        if not (pq_cfg.image_column or pq_cfg.path_column) or not pq_cfg.caption_column:
            raise ValueError("input.parquet: give image_column or path_column, and caption_column")
        if self.input.max_pixels < 1 or self.input.batch_size < 1 or self.input.max_caption_chars < 0:
            raise ValueError("input.max_pixels and input.batch_size must be >= 1, input.max_caption_chars >= 0")
        if not self.rewards:
            raise ValueError("config needs at least one reward under 'rewards'")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        if not all(r.rank for r in self.rewards):
            raise ValueError("rewards[].rank applies to the build only; synpref filter ranks nothing "
                             "(filter with filter.thresholds)")
        for r in self.rewards:
            if r.name not in available_rewards():
                raise ValueError(f"unknown reward {r.name!r}; available: {available_rewards()}")
            create_reward(r.name, r.params)  # bad params fail here, not on workers
        check_thresholds(self.filter.thresholds, names, "filter.thresholds")
        top = self.filter.top_fraction
        if top is not None:
            if top.reward not in names:
                raise ValueError(f"filter.top_fraction: reward {top.reward!r} is not in rewards {names}")
            if not 0.0 < top.fraction <= 1.0:
                raise ValueError(f"filter.top_fraction.fraction must be in (0, 1], got {top.fraction}")
            if top.num_quantiles < 2:
                raise ValueError("filter.top_fraction.num_quantiles must be >= 2")
        if not -1 <= self.filter.near_duplicate_distance <= 15:
            raise ValueError("filter.near_duplicate_distance must be -1 (off) or 0..15 bits, "
                             f"got {self.filter.near_duplicate_distance}")
        if self.output.samples_per_shard < 1:
            raise ValueError("output.samples_per_shard must be >= 1")
        return self


def filter_config_from_dict(data: dict) -> FilterJobConfig:
    data = dict(data)
    if isinstance((data.get("input") or {}).get("source"), str):  # one source given as a plain string
        data["input"] = {**data["input"], "source": [data["input"]["source"]]}
    return from_dict(FilterJobConfig, data, "config").validate()  # not "filter": a section has that name


def load_filter_config(path: str, overrides: list[str] | dict | None = None) -> FilterJobConfig:
    return filter_config_from_dict(apply_overrides(load_yaml(path), overrides))


def filter_config_to_dict(cfg: FilterJobConfig) -> dict:
    return dataclasses.asdict(cfg)
