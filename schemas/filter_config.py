"""Config of ``synpref filter``: score an existing web image-text corpus with the build's rewards and filter it.

Pydantic models loaded like every config (``schemas/loading.py``); corpus source formats and reward names
are plug-ins, checked by the filter's preflight.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from .config import (DEFAULT_MAX_PIXELS, Location, RewardConfig, ScoreThreshold, Strings,
                                    check_thresholds, check_unique_rewards)
from .loading import ConfigModel, load_config


class ParquetInputConfig(ConfigModel):
    """Column names of Parquet inputs (defaults: img2dataset's ``output_format: parquet``)."""

    image_column: str = "jpg"  # image bytes, or a Hugging Face Image struct {bytes, path}
    path_column: str = "path"  # image path (relative to the Parquet file) or URL, used where there are no bytes
    caption_column: str = "caption"
    key_column: str = "key"  # absent or null: <file stem>_<row number>
    batch_rows: int = Field(256, ge=1)  # rows read from the table at a time
    # folders or URL prefixes, besides the Parquet file's own folder, that the path column may point into;
    # any other path (../x, /etc/passwd, another URL) is dropped as path_outside_corpus
    allowed_roots: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _columns(self) -> "ParquetInputConfig":
        if not (self.image_column or self.path_column) or not self.caption_column:
            raise ValueError("give image_column or path_column, and caption_column")
        return self


class CorpusInputConfig(ConfigModel):
    """Where the corpus is and how to read it (``transforms/corpus_sources.py``).

    ``source``: one or more folders, globs or files; local or any fsspec URL. ``format``: ``auto`` tells it
    from the file names (``.tar``, ``.tar.gz``/``.tgz``: WebDataset shards in img2dataset's layout,
    ``<key>.jpg|png|webp``, ``<key>.txt``, ``<key>.json``; ``.parquet``: tables of image bytes or paths),
    and a folder holding tar shards is read as tars (img2dataset's per-shard Parquet beside them is
    metadata, not input); ``tar`` or ``parquet`` forces one.
    """

    source: Strings = Field((), validate_default=True)
    format: str = "auto"  # or a registered corpus source name
    parquet: ParquetInputConfig = ParquetInputConfig()
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # images declaring more pixels are dropped as too_many_pixels
    batch_size: int = Field(16, ge=1)  # images per scoring call inside one shard
    max_caption_chars: int = Field(0, ge=0)  # 0: no limit; longer captions are dropped as caption_too_long
    # JPEGs decoded at 1/2..1/8 scale (libjpeg DCT scaling) when every reward first shrinks images to a
    # fixed size (CLIP-style preprocessing: clip_score, laion_aesthetic, image_reward, hpsv2, vqascore, and
    # the HF image processor's resize of pickscore, mps, nsfw), never below that size; scores move slightly.
    # Otherwise full-size decoding (a warning says why).
    jpeg_draft: bool = False

    @field_validator("source")
    @classmethod
    def _some_source(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or not all(v.strip() for v in value):
            raise ValueError("give a folder, glob or list of .tar / .tar.gz shards or .parquet tables")
        return value


class TopFraction(ConfigModel):
    """Keep the samples whose ``reward`` score is at or above the global (1 - ``fraction``) quantile."""

    reward: str
    fraction: float = Field(gt=0, le=1)
    num_quantiles: int = Field(1001, ge=2)  # resolution of Beam's ApproximateQuantiles (exact on small corpora)


class EmbedderConfig(ConfigModel):
    """A registered image embedder (``transforms/embedders.py``: ``open_clip``, ``thumbnail``) and its params."""

    name: str = "open_clip"
    params: dict[str, Any] = {}
    model_copies: int = Field(0, ge=0)  # as a reward's: 0 = one model per worker process
    accelerator: str = ""  # a resource hint on the embedding step only, e.g. type:nvidia-l4;count:1


class SemanticDedupConfig(ConfigModel):
    """SemDeDup (arXiv 2303.09540): embed, cluster by k-means, drop near-duplicates within each cluster.

    A sample whose cosine similarity to a kept sample of its cluster is at least ``threshold`` is dropped
    (``semantic_duplicate``); within a cluster samples are visited by key, smallest first (or by the
    ``keep_highest`` reward's score, highest first, then key), so the kept representative is the smallest
    key (the best-scored sample). Centroids are fitted on at most ``sample_size`` embeddings (a
    seeded sample), so no worker holds every embedding.
    """

    embedder: EmbedderConfig = EmbedderConfig()
    threshold: float = Field(gt=0, le=1)  # cosine similarity at or above which a sample is a duplicate
    num_clusters: int = Field(64, ge=1)
    sample_size: int = Field(50_000, ge=1)  # embeddings the centroids are fitted on
    iterations: int = Field(20, ge=1)  # Lloyd iterations
    seed: int = 0
    keep_highest: Optional[str] = None  # a reward name: of near duplicates, keep the one it scores highest

    @model_validator(mode="after")
    def _enough_samples(self) -> "SemanticDedupConfig":
        if self.sample_size < self.num_clusters:
            raise ValueError(f"sample_size ({self.sample_size}) must be at least num_clusters ({self.num_clusters})")
        return self


class CorpusFilterConfig(ConfigModel):
    """``mode: and`` keeps a sample that passes every criterion; ``or`` one that passes any.

    Exact duplicates (sha256 of the image bytes) are always removed first: the smallest key is kept.
    """

    thresholds: tuple[ScoreThreshold, ...] = ()
    top_fraction: Optional[TopFraction] = None
    mode: Literal["and", "or"] = "and"
    dedup: Literal["exact", "none"] = "exact"
    # Near duplicates: samples whose 64-bit perceptual hash (dHash) is within this many bits of a sample
    # with a smaller key are dropped (near_duplicate). -1: off. Runs after exact dedup, before the filters.
    near_duplicate_distance: int = Field(-1, ge=-1, le=15)
    # Semantic near duplicates by embedding similarity; off when absent. Runs after the other dedups,
    # before the filters; embeddings are kept in output_dir/embeddings/ and reused by a rerun.
    semantic_dedup: Optional[SemanticDedupConfig] = None


class FilterOutputConfig(ConfigModel):
    output_dir: Location = "out/filter"
    samples_per_shard: int = Field(1000, ge=1)
    # After the manifest is written, delete the _cache/ entries this run did not use (other scoring
    # settings, changed or removed input): _cache/ then holds exactly what a rerun of this job reuses.
    # false: keep them (to switch back to an earlier reward setting without re-scoring).
    prune_cache: bool = True


class FilterJobConfig(ConfigModel):
    input: CorpusInputConfig
    rewards: tuple[RewardConfig, ...]
    filter: CorpusFilterConfig = CorpusFilterConfig()
    output: FilterOutputConfig = FilterOutputConfig()
    torch_threads: int = Field(1, ge=0)
    beam_options: Strings = ()

    @model_validator(mode="after")
    def _consistent(self) -> "FilterJobConfig":
        names = check_unique_rewards(self.rewards)
        if not all(r.rank for r in self.rewards):
            raise ValueError("rewards[].rank applies to the build only; synpref filter ranks nothing "
                             "(filter with filter.thresholds)")
        check_thresholds(self.filter.thresholds, names, "filter.thresholds")
        semantic = self.filter.semantic_dedup
        if semantic is not None and semantic.keep_highest is not None and semantic.keep_highest not in names:
            raise ValueError(f"filter.semantic_dedup.keep_highest: reward {semantic.keep_highest!r} is not in "
                             f"rewards {names}")
        top = self.filter.top_fraction
        if top is not None and top.reward not in names:
            raise ValueError(f"filter.top_fraction: reward {top.reward!r} is not in rewards {names}")
        return self


def filter_config_from_dict(data: dict) -> FilterJobConfig:
    return FilterJobConfig.from_dict(data)


def load_filter_config(path: str, overrides: list[str] | dict | None = None) -> FilterJobConfig:
    return load_config(FilterJobConfig, path, overrides)
