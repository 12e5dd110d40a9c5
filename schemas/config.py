"""Job configuration: YAML -> frozen dataclasses, validated once before anything runs.

DoFns receive these dataclasses (or plain values), never YAML.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class PromptsConfig:
    """Where prompts come from and how they are cleaned.

    ``source`` is a path or URL (local, gs://, s3://, anything fsspec opens) to a
    .txt / .jsonl / .csv / .parquet file, ``builtin`` for the bundled set, or
    ``hf://<dataset name>`` for a Hugging Face dataset (``split`` applies).
    """

    source: str = "builtin"
    format: Literal["auto", "txt", "jsonl", "csv", "parquet", "hf"] = "auto"
    text_field: str = "prompt"
    category_field: str = "category"
    split: str = "train"
    max_chars: int = 300
    num_prompts: Optional[int] = None  # sample this many (seeded); None keeps all


@dataclass(frozen=True)
class GeneratorConfig:
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
    model: str
    type: str = "diffusers"
    revision: str = ""
    scheduler: str = ""
    num_inference_steps: int = 30
    guidance_scale: Optional[float] = None  # null: the pipeline's default (SD 7.5, SDXL 5.0, SD3 7.0...)
    height: int = 512
    width: int = 512
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "auto"  # auto: a GPU if one is visible (processes spread over GPUs), else cpu with a warning
    negative_prompt: str = ""
    # Two-stage pipelines (Stable Cascade's combined pipeline): the prior's steps and guidance and the
    # decoder's guidance. Refused for one-stage pipelines.
    prior_num_inference_steps: Optional[int] = None
    prior_guidance_scale: Optional[float] = None
    decoder_guidance_scale: Optional[float] = None
    # Any other keyword argument of the pipeline's ``__call__``, as given (e.g. max_sequence_length: 300,
    # use_resolution_binning: false); checked against its signature before any model loads.
    call_args: dict[str, Any] = field(default_factory=dict)
    cache_dir: str = ""
    # Prompts per diffusers call. 1 (default) is the deterministic mode: one prompt's K seeds per call,
    # so pixels never depend on batching. >1 fills GPUs better, but pixels then depend on which
    # prompts share a batch (last bits on CPU and GPU), so reruns are not byte-identical.
    batch_size: int = 1
    # 0: one model per worker process (Beam's default). N >= 1: N copies per machine shared by all
    # of its worker processes (Beam's share_model_across_processes / model_copies): one per GPU.
    model_copies: int = 0
    # Beam resource hint for this stage, e.g. "type:nvidia-l4;count:1;install-nvidia-driver", so a
    # runner with right-fitting (Dataflow) runs only generation and scoring on GPU workers.
    accelerator: str = ""


@dataclass(frozen=True)
class RewardConfig:
    """A registered reward (see ``synpref.transforms.rewards.available_rewards()``) and its params."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    # Prompts (each with all its candidates, every generator's) per scoring call. 1 (default) is
    # deterministic: scores never depend on batching. More fills a GPU better; on GPUs the batch
    # composition can change the last bits of a score.
    units_per_call: int = 1
    model_copies: int = 0  # as GeneratorConfig.model_copies
    accelerator: str = ""  # as GeneratorConfig.accelerator
    # Rewards with the same group run as one ensemble step (each image decoded once, shared
    # preprocessing computed once). Give a large judge its own group to run it in a separate step.
    group: str = ""
    # false: the reward is scored and recorded (shard JSON, index, manifest) but left out of the
    # labels (aggregator, agreement, dataset statistics, weights): use it in
    # ``filter.candidate_thresholds`` only, e.g. ``nsfw`` (higher = more likely NSFW).
    rank: bool = True


@dataclass(frozen=True)
class ScoreThreshold:
    """Keep an image when ``min <= score`` and ``score <= max`` (either bound may be left out)."""

    reward: str
    min: Optional[float] = None
    max: Optional[float] = None

    def violation(self, score: float) -> tuple[str, str]:
        """(reason, detail) when ``score`` is outside a bound, else ('', '')."""
        if self.min is not None and score < self.min:
            return "below_threshold", f"{self.reward} {score:.6g} < min {self.min}"
        if self.max is not None and score > self.max:
            return "above_threshold", f"{self.reward} {score:.6g} > max {self.max}"
        return "", ""


def check_thresholds(thresholds, names, where: str) -> None:
    """One-line errors for thresholds naming an unknown reward, with no bound, or with min > max."""
    for t in thresholds:
        if t.reward not in names:
            raise ValueError(f"{where}: reward {t.reward!r} is not in rewards {list(names)}")
        if t.min is None and t.max is None:
            raise ValueError(f"{where}: {t.reward}: give min, max or both")
        if t.min is not None and t.max is not None and t.min > t.max:
            raise ValueError(f"{where}: {t.reward}: min {t.min} > max {t.max}")


@dataclass(frozen=True)
class RankingConfig:
    """How candidates are labelled (``synpref.transforms.aggregators``; PAPER_NOTES s.1 and s.5).

    ``aggregator``: a registered name: ``syn_pic`` (default, the paper's win rate), ``mean_bt``,
    ``mean_zscore``, ``weighted_sum``, ``reliability_weighted``. ``reward_weights``: {reward name:
    weight >= 0}, missing names weigh 1; used by every aggregator except ``reliability_weighted``
    (which estimates its own) and by the pair agreement. ``zscore_scope``: statistics of
    ``mean_zscore`` over the whole dataset or per prompt.
    """

    aggregator: str = "syn_pic"
    reward_weights: dict[str, float] = field(default_factory=dict)
    zscore_scope: Literal["dataset", "prompt"] = "dataset"


@dataclass(frozen=True)
class FilterConfig:
    """Noisy-pair filter: keep a pair when agreement - 0.5 > ``min_agreement_margin``, all rewards
    agree (``require_unanimous``) and phi_winner - phi_loser >= ``min_aggregate_gap`` (0: off).

    Agreement is the (weighted) fraction of rewards preferring the winner (PAPER_NOTES s.1, s.5).
    """

    min_agreement_margin: float = 0.0
    require_unanimous: bool = False
    min_candidates: int = 2
    min_aggregate_gap: float = 0.0
    # Which of the pairs that pass the filter the pairwise layout keeps (the rest are dropped as
    # ``not_selected``): ``all``; ``best_worst``: only (rank 1, last rank); ``top_bottom``: winner
    # among the ``top_bottom_k`` best ranks and loser among the ``top_bottom_k`` worst.
    pair_selection: Literal["all", "best_worst", "top_bottom"] = "all"
    top_bottom_k: int = 1
    # Drop a pair whose two images are near-duplicates (``near_duplicate_pair``): Hamming distance of
    # their 64-bit difference hashes <= this. null: off. 0 catches only hash-identical images.
    near_duplicate_distance: Optional[int] = None
    # Candidate filters, within a prompt's candidates before ranking (transforms/candidate_filters.py,
    # docs/math.md). ``degenerate_image``: grey-level sd < ``min_grey_sd`` (0..255; 0: off; blank,
    # black or one flat colour), or more than ``max_flat_share`` of the pixels within 8 levels of one
    # colour (null: off). ``low_diversity_group``: every pair of the prompt's candidates within
    # ``low_diversity_distance`` bits of each other's difference hash (null: off).
    # ``near_duplicate_candidate``: a candidate within ``near_duplicate_candidate_distance`` bits of a
    # candidate with a smaller id that is kept (null: off). Unrelated images differ in ~32 of 64 bits.
    min_grey_sd: float = 2.0
    max_flat_share: Optional[float] = 0.99
    low_diversity_distance: Optional[int] = 8
    near_duplicate_candidate_distance: Optional[int] = 4
    # Score bounds, applied before the other candidate filters: a candidate with a score below a
    # ``min`` (``below_threshold``) or above a ``max`` (``above_threshold``) is dropped; e.g.
    # ``[{reward: nsfw, max: 0}]`` drops what the safety checker flags. Rewards named here may be
    # ``rank: false`` (scored, not ranked).
    candidate_thresholds: tuple[ScoreThreshold, ...] = ()


@dataclass(frozen=True)
class OutputConfig:
    output_dir: str = "out/build"
    samples_per_shard: int = 256
    staging_dir: str = ""  # default: <output_dir>/_staging
    # Staged images are stored again inside the tars. delete_when_done removes the default staging
    # folder once a run has finished cleanly (manifest written, ledger balanced); keep leaves it for
    # reruns that change only ranking/filter settings. A custom staging_dir is a shared cache: kept.
    staging: Literal["delete_when_done", "keep"] = "delete_when_done"
    # How images are encoded. Generation stages each image in this encoding and the shards copy those
    # bytes (nothing is encoded twice); members are img{i}.png / .jpg / .webp, win.<ext>, lose.<ext>.
    # jpeg uses ``jpeg_quality`` (4:2:0 subsampling, no optimisation passes); webp is lossless.
    image_format: Literal["png", "jpeg", "webp"] = "png"
    jpeg_quality: int = 95


@dataclass(frozen=True)
class BuildConfig:
    prompts: PromptsConfig
    generators: tuple[GeneratorConfig, ...]
    rewards: tuple[RewardConfig, ...]
    candidates_per_generator: int = 2
    seed: int = 0
    # torch intra-op threads per worker process. Runners already run one worker per
    # core; more threads on top oversubscribe the CPU (measured: 5x slower at 2 threads
    # on 2 cores under the DirectRunner). 0 leaves torch's default.
    torch_threads: int = 1
    # A run fails (non-zero exit) when any generator or reward loses more than this share of its
    # items to errors (exceptions, NaN images or scores). Every loss is in dead_letter/ either way.
    max_error_share: float = 0.1
    # Beam pipeline flags (e.g. ["--runner=DataflowRunner", "--region=..."]); command-line flags win.
    beam_options: tuple[str, ...] = ()
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

    def validate(self) -> "BuildConfig":
        if not self.generators:
            raise ValueError("config needs at least one generator under 'generators'")
        if not self.rewards:
            raise ValueError("config needs at least one reward under 'rewards'")
        ids = [g.id for g in self.generators]
        if len(set(ids)) != len(ids):
            raise ValueError(f"generator ids must be unique, got {ids}")
        for g in self.generators:
            if not _ID_RE.match(g.id):
                raise ValueError(f"generator id {g.id!r} may only use letters, digits, '_' and '-' "
                                 "(it becomes part of candidate ids and WebDataset keys, where '.' is not allowed)")
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward names must be unique, got {names}")
        if not self.ranking_rewards:
            raise ValueError("every reward has rank: false; at least one reward must rank (rank: true, the default)")
        check_thresholds(self.filter.candidate_thresholds, names, "filter.candidate_thresholds")
        if self.candidates_per_generator < 1:
            raise ValueError("candidates_per_generator must be >= 1")
        if len(self.generators) * self.candidates_per_generator < 2:
            raise ValueError("need at least 2 candidates per prompt (generators x candidates_per_generator)")
        for g in self.generators:
            if g.batch_size < 1 or g.model_copies < 0:
                raise ValueError(f"generator {g.id}: batch_size must be >= 1 and model_copies >= 0")
        for r in self.rewards:
            if r.units_per_call < 1 or r.model_copies < 0:
                raise ValueError(f"reward {r.name}: units_per_call must be >= 1 and model_copies >= 0")
        if not 0.0 <= self.max_error_share <= 1.0:
            raise ValueError("max_error_share must be in [0, 1]")
        if self.output.samples_per_shard < 1:
            raise ValueError("output.samples_per_shard must be >= 1")
        if not 1 <= self.output.jpeg_quality <= 100:
            raise ValueError(f"output.jpeg_quality must be in [1, 100], got {self.output.jpeg_quality}")
        if not 0.0 <= self.filter.min_agreement_margin < 0.5:
            raise ValueError("filter.min_agreement_margin must be in [0, 0.5)")
        if not 0.0 <= self.filter.min_aggregate_gap <= 1.0:
            raise ValueError(f"filter.min_aggregate_gap must be in [0, 1] (labels are in [0, 1]), "
                             f"got {self.filter.min_aggregate_gap}")
        from synpref.transforms.aggregators import available_aggregators, get_aggregator

        if self.ranking.aggregator not in available_aggregators():
            raise ValueError(f"unknown ranking.aggregator {self.ranking.aggregator!r}; "
                             f"available: {available_aggregators()}")
        if not isinstance(self.ranking.reward_weights, dict):
            raise ValueError("ranking.reward_weights must be a mapping {reward name: weight}")
        unknown_w = sorted(set(self.ranking.reward_weights) - set(names))
        if unknown_w:
            raise ValueError(f"ranking.reward_weights names unknown reward(s) {unknown_w}; rewards: {names}")
        filter_only = sorted(set(self.ranking.reward_weights) - set(self.ranking_rewards))
        if filter_only:
            raise ValueError(f"ranking.reward_weights names filter-only reward(s) {filter_only} (rank: false)")
        for r, w in self.ranking.reward_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
                raise ValueError(f"ranking.reward_weights.{r} must be a finite number >= 0, got {w!r}")
        if self.ranking.reward_weights and not any(
                float(self.ranking.reward_weights.get(r, 1)) > 0 for r in self.ranking_rewards):
            raise ValueError("ranking.reward_weights: at least one reward needs a positive weight")
        if self.ranking.reward_weights and not get_aggregator(self.ranking.aggregator).uses_config_weights:
            raise ValueError(f"ranking.aggregator {self.ranking.aggregator!r} estimates its own reward weights: "
                             "leave ranking.reward_weights empty")
        if self.filter.near_duplicate_distance is not None and not 0 <= self.filter.near_duplicate_distance <= 64:
            raise ValueError(f"filter.near_duplicate_distance must be in [0, 64] or null, "
                             f"got {self.filter.near_duplicate_distance}")
        for key in ("low_diversity_distance", "near_duplicate_candidate_distance"):
            value = getattr(self.filter, key)
            if value is not None and not 0 <= value <= 64:
                raise ValueError(f"filter.{key} must be in [0, 64] or null, got {value}")
        if not 0.0 <= self.filter.min_grey_sd <= 127.5:
            raise ValueError(f"filter.min_grey_sd must be in [0, 127.5] (grey levels), got {self.filter.min_grey_sd}")
        if self.filter.max_flat_share is not None and not 0.5 <= self.filter.max_flat_share <= 1.0:
            raise ValueError(f"filter.max_flat_share must be in [0.5, 1] or null, got {self.filter.max_flat_share}")
        if self.filter.top_bottom_k < 1:
            raise ValueError(f"filter.top_bottom_k must be >= 1, got {self.filter.top_bottom_k}")
        if self.filter.min_candidates < 2:
            raise ValueError(f"filter.min_candidates must be >= 2 (a ranking needs two images), "
                             f"got {self.filter.min_candidates}")
        if self.prompts.num_prompts is not None and self.prompts.num_prompts < 1:
            raise ValueError(f"prompts.num_prompts must be >= 1 or null (null keeps every prompt), "
                             f"got {self.prompts.num_prompts}")
        if self.prompts.max_chars < 1:
            raise ValueError(f"prompts.max_chars must be >= 1, got {self.prompts.max_chars}")
        for g in self.generators:
            if not isinstance(g.call_args, dict) or not all(isinstance(k, str) for k in g.call_args):
                raise ValueError(f"generator {g.id}: call_args must be a mapping {{argument name: value}}")
            try:
                json.dumps(g.call_args, allow_nan=False)
            except (TypeError, ValueError):
                raise ValueError(f"generator {g.id}: call_args values must be plain YAML values "
                                 "(numbers, strings, booleans, lists, mappings)") from None
            if g.prior_num_inference_steps is not None and g.prior_num_inference_steps < 1:
                raise ValueError(f"generator {g.id}: prior_num_inference_steps must be >= 1")
            if g.num_inference_steps < 1:
                raise ValueError(f"generator {g.id}: num_inference_steps must be >= 1")
        for g in self.generators:
            # The SD VAE downsamples by 8: any other size fails on every call, hours into a run.
            if g.type == "diffusers" and (g.height < 8 or g.width < 8 or g.height % 8 or g.width % 8):
                raise ValueError(f"generator {g.id}: height and width must be positive multiples of 8 "
                                 f"for diffusers models, got {g.height}x{g.width}")
        from synpref.transforms.rewards import available_rewards

        for r in self.rewards:
            if r.name not in available_rewards():
                raise ValueError(f"unknown reward {r.name!r}; available: {available_rewards()}")
        return self


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass ``cls`` from a mapping: unknown keys rejected, every value checked
    against its type hint (nested dataclasses, tuples of them, Literal choices, Optional,
    numbers and booleans given as strings by ``--set``)."""
    where = where or cls.__name__
    if dataclasses.is_dataclass(data):
        return data
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(names)}")
    kwargs = {key: coerce(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def coerce(hint, value, where: str):
    """Check ``value`` against type ``hint``; convert strings where that is unambiguous."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or str(value).lower() in ("null", "none")):
            return None
        return coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is Literal:
        if value not in args:
            quote = " (YAML reads bare no/yes as booleans: quote it)" if isinstance(value, bool) else ""
            raise ValueError(f"{where}: {value!r} is not one of {list(args)}{quote}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str) and args and args[0] is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        items = [coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ValueError(f"{where}: must be true or false, got {value!r}")
        return value
    if hint in (int, float, str):
        if isinstance(value, bool) and hint is not str:
            raise ValueError(f"{where}: must be {hint.__name__}, got {value!r}")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: must be int, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: must be {hint.__name__}, got {value!r}") from None
    return value


def apply_overrides(data: dict, overrides: list[str] | dict | None) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    if not overrides:
        return data
    items = overrides.items() if isinstance(overrides, dict) else (o.split("=", 1) for o in overrides)
    for key, value in items:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if isinstance(node, list):
                node = node[int(p)]
            else:
                node = node.setdefault(p, {})
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value
    return data


def load_yaml(path: str) -> dict:
    import fsspec

    with fsspec.open(path, "r") as f:
        return yaml.safe_load(f) or {}


def build_config_from_dict(data: dict) -> BuildConfig:
    return from_dict(BuildConfig, data, "build").validate()


def load_build_config(path: str, overrides: list[str] | dict | None = None) -> BuildConfig:
    return build_config_from_dict(apply_overrides(load_yaml(path), overrides))


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
