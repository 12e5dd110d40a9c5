"""Build job configuration: pydantic models, validated once before anything runs.

DoFns receive these frozen models (or plain values), never YAML. Plug-in names (rewards, generator types,
aggregators) are checked where the pipeline is built (``pipelines/preflight.py``), not here.
"""
from __future__ import annotations

import json

import re
from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from .loading import ConfigModel, load_config, non_empty, one_or_many

_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Images declaring more pixels are refused from their header, before decoding (decompression bombs).
# 64 megapixels: far above any T2I output (SDXL/SD3 are ~1 MP, 4K is 8.3 MP), far below a bomb.
DEFAULT_MAX_PIXELS = 64_000_000
Location = Annotated[str, BeforeValidator(non_empty)]
Strings = Annotated[tuple[str, ...], BeforeValidator(one_or_many)]


class PromptsConfig(ConfigModel):
    """Where prompts come from and how they are cleaned.

    ``source`` is a path or URL (local, gs://, s3://, anything fsspec opens) to a
    .txt / .jsonl / .csv / .parquet file, ``builtin`` for the bundled set, or
    ``hf://<dataset name>`` for a Hugging Face dataset (``split`` applies).
    """

    source: Location = "builtin"
    format: Literal["auto", "txt", "jsonl", "csv", "parquet", "hf"] = "auto"
    text_field: str = "prompt"
    category_field: str = "category"
    split: str = "train"
    max_chars: int = Field(300, ge=1)
    num_prompts: Optional[int] = Field(None, ge=1)  # sample this many (seeded); None keeps all


class GeneratorConfig(ConfigModel):
    """One text-to-image model, loaded with diffusers' ``from_pretrained``.

    ``model`` is a hub id, a local directory or a gs:// / s3:// URL (copied to
    ``cache_dir`` first). ``scheduler`` names a diffusers scheduler class to swap
    in (e.g. ``DDIMScheduler``); empty keeps the model's own.

    Each setting is passed under the name the pipeline's ``__call__`` gives it, and only where
    it takes one (``transforms/generators/pipeline_call.py``); a setting the pipeline does not
    take is refused before the run. ``num_inference_steps`` is the decoder's for two-stage
    pipelines (Stable Cascade). A setting left null takes the family's model-card value where
    synpref knows one (Stable Cascade: prior 20 steps at guidance 4.0, decoder guidance 0.0),
    else the pipeline's own default; the lineage records the value passed either way.
    """

    id: str
    model: Location
    type: str = "diffusers"
    revision: str = ""
    scheduler: str = ""
    num_inference_steps: int = Field(30, ge=1)
    guidance_scale: Optional[float] = None  # null: the pipeline's default (SD 7.5, SDXL 5.0, SD3 7.0...)
    height: int = Field(512, ge=1)
    width: int = Field(512, ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"  # auto: a GPU if one is visible (processes spread over GPUs), else cpu with a warning
    negative_prompt: str = ""
    # Two-stage pipelines (Stable Cascade's combined pipeline): the prior's steps and guidance and the
    # decoder's guidance. Refused for one-stage pipelines.
    prior_num_inference_steps: Optional[int] = Field(None, ge=1)
    prior_guidance_scale: Optional[float] = None
    decoder_guidance_scale: Optional[float] = None
    # Any other keyword argument of the pipeline's ``__call__``, as given (e.g. max_sequence_length: 300,
    # use_resolution_binning: false); checked against its signature before any model loads.
    call_args: dict[str, Any] = Field(default_factory=dict)
    cache_dir: str = ""
    # Prompts per diffusers call. 1 (default) is the deterministic mode: one prompt's K seeds per call,
    # so pixels never depend on batching. >1 fills GPUs better, but pixels then depend on which
    # prompts share a batch (last bits on CPU and GPU), so reruns are not byte-identical.
    batch_size: int = Field(1, ge=1)
    # 0: one model per worker process (Beam's default). N >= 1: N copies per machine shared by all
    # of its worker processes (Beam's share_model_across_processes / model_copies): one per GPU.
    model_copies: int = Field(0, ge=0)
    # Beam resource hint for this stage, e.g. "type:nvidia-l4;count:1;install-nvidia-driver", so a
    # runner with right-fitting (Dataflow) runs only generation and scoring on GPU workers.
    accelerator: str = ""
    # A LoRA folder (``pytorch_lora_weights.safetensors``, as ``synpref train`` writes) applied with
    # ``load_lora_weights`` at load, or a fully fine-tuned denoiser folder (``unet``/``transformer``)
    # loaded in place of the model's own. Their file checksums are part of the staging key.
    lora: str = ""
    denoiser: str = ""

    @field_validator("call_args")
    @classmethod
    def _plain_values(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError("values must be plain YAML values (numbers, strings, booleans, lists, "
                             "mappings)") from None
        return value

    @field_validator("id")
    @classmethod
    def _id_is_a_key(cls, value: str) -> str:
        if not _ID_RE.match(value):
            raise ValueError(f"generator id {value!r} may only use letters, digits, '_' and '-' "
                             "(it becomes part of candidate ids and WebDataset keys, where '.' is not allowed)")
        return value

    @model_validator(mode="after")
    def _diffusers_sizes(self) -> "GeneratorConfig":
        if self.lora and self.denoiser:
            raise ValueError("give lora or denoiser, not both")
        # The SD VAE downsamples by 8: any other size fails on every call, hours into a run.
        if self.type == "diffusers" and (self.height % 8 or self.width % 8):
            raise ValueError(f"generator {self.id}: height and width must be positive multiples of 8 "
                             f"for diffusers models, got {self.height}x{self.width}")
        return self


class RewardConfig(ConfigModel):
    """A registered reward (``transforms/rewards/``) and its params."""

    name: str
    params: dict[str, Any] = {}
    # Prompts (each with all its candidates, every generator's) per scoring call. 1 (default) is
    # deterministic: scores never depend on batching. More fills a GPU better; on GPUs the batch
    # composition can change the last bits of a score.
    units_per_call: int = Field(1, ge=1)
    model_copies: int = Field(0, ge=0)  # as GeneratorConfig.model_copies
    accelerator: str = ""  # as GeneratorConfig.accelerator
    # Rewards with the same group run as one ensemble step (each image decoded once, shared
    # preprocessing computed once). Give a large judge its own group to run it in a separate step.
    group: str = ""
    # false: the reward is scored and recorded (shard JSON, index, manifest) but left out of the
    # labels (aggregator, agreement, dataset statistics, weights): use it in
    # ``filter.candidate_thresholds`` only, e.g. ``nsfw`` (higher = more likely NSFW).
    rank: bool = True


class ScoreThreshold(ConfigModel):
    """Keep an image when ``min <= score`` and ``score <= max`` (either bound may be left out)."""

    reward: str
    min: Optional[float] = None
    max: Optional[float] = None

    @model_validator(mode="after")
    def _a_bound(self) -> "ScoreThreshold":
        if self.min is None and self.max is None:
            raise ValueError(f"{self.reward}: give min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{self.reward}: min {self.min} > max {self.max}")
        return self

    def violation(self, score: float) -> tuple[str, str]:
        """(reason, detail) when ``score`` is outside a bound, else ('', '')."""
        if self.min is not None and score < self.min:
            return "below_threshold", f"{self.reward} {score:.6g} < min {self.min}"
        if self.max is not None and score > self.max:
            return "above_threshold", f"{self.reward} {score:.6g} > max {self.max}"
        return "", ""


def check_thresholds(thresholds, names, where: str) -> None:
    """A threshold must name one of the job's rewards."""
    for t in thresholds:
        if t.reward not in names:
            raise ValueError(f"{where}: reward {t.reward!r} is not in rewards {list(names)}")


def check_unique_rewards(rewards) -> list[str]:
    if not rewards:
        raise ValueError("config needs at least one reward under 'rewards'")
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be unique, got {names}")
    return names


def _weight(value: float) -> float:
    if value < 0:
        raise ValueError(f"must be a finite number >= 0, got {value!r}")
    return value


class RankingConfig(ConfigModel):
    """How candidates are labelled (``transforms/aggregators.py``; docs/math.md s.1).

    ``aggregator``: a registered name: ``syn_pic`` (default, the paper's win rate, arXiv 2410.18013
    Algorithm 1), ``mean_bt``, ``mean_zscore``, ``weighted_sum``, ``reliability_weighted``.
    ``reward_weights``: {reward name: weight >= 0}, missing names weigh 1; used by every aggregator except
    ``reliability_weighted`` (which estimates its own) and by the pair agreement. ``zscore_scope``:
    statistics of ``mean_zscore`` over the whole dataset or per prompt.
    """

    aggregator: str = "syn_pic"
    reward_weights: dict[str, Annotated[float, AfterValidator(_weight)]] = {}
    zscore_scope: Literal["dataset", "prompt"] = "dataset"


class FilterConfig(ConfigModel):
    """Noisy-pair filter: keep a pair when agreement - 0.5 > ``min_agreement_margin``, all rewards
    agree (``require_unanimous``) and phi_winner - phi_loser >= ``min_aggregate_gap`` (0: off).

    Agreement is the (weighted) fraction of rewards preferring the winner (docs/math.md s.3).
    """

    min_agreement_margin: float = Field(0.0, ge=0, lt=0.5)
    require_unanimous: bool = False
    min_candidates: int = Field(2, ge=2)  # a ranking needs two images
    min_aggregate_gap: float = Field(0.0, ge=0, le=1)  # labels are in [0, 1]
    # Which of the pairs that pass the filter the pairwise layout keeps (the rest are dropped as
    # ``not_selected``): ``all``; ``best_worst``: only (rank 1, last rank); ``top_bottom``: winner
    # among the ``top_bottom_k`` best ranks and loser among the ``top_bottom_k`` worst.
    pair_selection: Literal["all", "best_worst", "top_bottom"] = "all"
    top_bottom_k: int = Field(1, ge=1)
    # Drop a pair whose two images are near-duplicates (``near_duplicate_pair``): Hamming distance of
    # their 64-bit difference hashes <= this. null: off. 0 catches only hash-identical images.
    near_duplicate_distance: Optional[int] = Field(None, ge=0, le=64)
    # Candidate filters, within a prompt's candidates before ranking (transforms/candidate_filters.py,
    # docs/math.md). ``degenerate_image``: grey-level sd < ``min_grey_sd`` (0..255; 0: off; blank,
    # black or one flat colour), or more than ``max_flat_share`` of the pixels within 8 levels of one
    # colour (null: off). ``low_diversity_group``: every pair of the prompt's candidates within
    # ``low_diversity_distance`` bits of each other's difference hash (null: off).
    # ``near_duplicate_candidate``: a candidate within ``near_duplicate_candidate_distance`` bits of a
    # candidate with a smaller id that is kept (null: off). Unrelated images differ in ~32 of 64 bits.
    min_grey_sd: float = Field(2.0, ge=0, le=127.5)
    max_flat_share: Optional[float] = Field(0.99, ge=0.5, le=1)
    low_diversity_distance: Optional[int] = Field(8, ge=0, le=64)
    near_duplicate_candidate_distance: Optional[int] = Field(4, ge=0, le=64)
    # Score bounds, applied before the other candidate filters: a candidate with a score below a
    # ``min`` (``below_threshold``) or above a ``max`` (``above_threshold``) is dropped; e.g.
    # ``[{reward: nsfw, max: 0}]`` drops what the safety checker flags. Rewards named here may be
    # ``rank: false`` (scored, not ranked).
    candidate_thresholds: tuple[ScoreThreshold, ...] = ()


class OutputConfig(ConfigModel):
    output_dir: Location = "out/build"
    samples_per_shard: int = Field(256, ge=1)
    staging_dir: str = ""  # default: <output_dir>/_staging
    # Staged images are stored again inside the tars. delete_when_done removes the default staging
    # folder once a run has finished cleanly (manifest written, ledger balanced); keep leaves it for
    # reruns that change only ranking/filter settings. A custom staging_dir is a shared cache: kept.
    staging: Literal["delete_when_done", "keep"] = "delete_when_done"
    # How images are encoded. Generation stages each image in this encoding and the shards copy those
    # bytes (nothing is encoded twice); members are img{i}.png / .jpg / .webp, win.<ext>, lose.<ext>.
    # jpeg uses ``jpeg_quality`` (4:2:0 subsampling, no optimisation passes); webp is lossless.
    image_format: Literal["png", "jpeg", "webp"] = "png"
    jpeg_quality: int = Field(95, ge=1, le=100)


class BuildConfig(ConfigModel):
    prompts: PromptsConfig
    generators: tuple[GeneratorConfig, ...]
    rewards: tuple[RewardConfig, ...]
    candidates_per_generator: int = Field(2, ge=1)
    seed: int = 0
    # torch intra-op threads per worker process. Runners already run one worker per
    # core; more threads on top oversubscribe the CPU (measured: 5x slower at 2 threads
    # on 2 cores under the DirectRunner). 0 leaves torch's default.
    torch_threads: int = Field(1, ge=0)
    # A run fails (non-zero exit) when any generator or reward loses more than this share of its
    # items to errors (exceptions, NaN images or scores). Every loss is in dead_letter/ either way.
    max_error_share: float = Field(0.1, ge=0, le=1)
    # Beam pipeline flags (e.g. ["--runner=DataflowRunner", "--region=..."]); command-line flags win.
    beam_options: Strings = ()
    ranking: RankingConfig = RankingConfig()
    filter: FilterConfig = FilterConfig()
    output: OutputConfig = OutputConfig()

    @property
    def ranking_rewards(self) -> tuple[str, ...]:
        """The rewards the labels are made of (``rank: true``), in config order."""
        return tuple(r.name for r in self.rewards if r.rank)

    @property
    def staging_dir(self) -> str:
        return self.output.staging_dir or self.output.output_dir.rstrip("/") + "/_staging"

    @model_validator(mode="after")
    def _consistent(self) -> "BuildConfig":
        """Rules between sections (plug-in names are checked by the pipeline's preflight)."""
        if not self.generators:
            raise ValueError("config needs at least one generator under 'generators'")
        ids = [g.id for g in self.generators]
        if len(set(ids)) != len(ids):
            raise ValueError(f"generator ids must be unique, got {ids}")
        names = check_unique_rewards(self.rewards)
        if not self.ranking_rewards:
            raise ValueError("every reward has rank: false; at least one reward must rank (rank: true, the default)")
        check_thresholds(self.filter.candidate_thresholds, names, "filter.candidate_thresholds")
        if len(self.generators) * self.candidates_per_generator < 2:
            raise ValueError("need at least 2 candidates per prompt (generators x candidates_per_generator)")
        weights = self.ranking.reward_weights
        unknown_w = sorted(set(weights) - set(names))
        if unknown_w:
            raise ValueError(f"ranking.reward_weights names unknown reward(s) {unknown_w}; rewards: {names}")
        filter_only = sorted(set(weights) - set(self.ranking_rewards))
        if filter_only:
            raise ValueError(f"ranking.reward_weights names filter-only reward(s) {filter_only} (rank: false)")
        if weights and not any(weights.get(r, 1) > 0 for r in self.ranking_rewards):
            raise ValueError("ranking.reward_weights: at least one reward needs a positive weight")
        return self


def build_config_from_dict(data: dict) -> BuildConfig:
    return BuildConfig.from_dict(data)


def load_build_config(path: str, overrides: list[str] | dict | None = None) -> BuildConfig:
    return load_config(BuildConfig, path, overrides)
