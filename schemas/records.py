"""Typed records that flow between pipeline stages, with the pyarrow schemas of their indexes.

No record carries pixels: generation stages each image as soon as it exists,
and every later stage passes ids, scores and the staged image's URI and hash,
loading pixels only where it needs them (scoring). Memory stays flat as data grows.
"""
from __future__ import annotations
from ..core.errors import one_line

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import pyarrow as pa


@dataclass(frozen=True)
class PromptRecord:
    """A normalised, deduplicated prompt. ``prompt_id`` is a content hash, stable across runs."""

    prompt_id: str
    prompt: str
    category: str = ""
    source: str = ""
    source_index: int = 0


@dataclass(frozen=True)
class Lineage:
    """Everything needed to regenerate one candidate image.

    ``height`` x ``width`` is the image's size. ``num_inference_steps`` and ``guidance_scale`` are the
    decoder's for two-stage pipelines (Stable Cascade); ``call_args`` holds every keyword argument the
    pipeline's ``__call__`` got besides prompt, generator and output_type, under the pipeline's own
    names (the prior's steps and guidance included). ``generated_height`` x ``generated_width`` is the
    size the model generated at: different from the image's when the pipeline snaps the request to a
    trained resolution and resizes the result (PixArt's and Sana's ``use_resolution_binning``).
    0 in records written before synpref recorded it.
    """

    generator_id: str
    model: str
    revision: str
    pipeline_class: str
    scheduler: str
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    dtype: str
    seed: int
    negative_prompt: str = ""
    call_args: dict[str, Any] = field(default_factory=dict)
    generated_height: int = 0
    generated_width: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GenerationRequest:
    """All candidates of one (prompt, generator): one deterministic diffusers call.

    ``image_keys[i]`` is the content address of candidate i: a hash of everything that
    determines its pixels (see ``staging.generation_key``), under which it is staged.
    """

    prompt: PromptRecord
    generator_id: str
    candidate_indices: tuple[int, ...]
    seeds: tuple[int, ...]
    image_keys: tuple[str, ...] = ()

    def candidate_id(self, i: int) -> str:
        return candidate_id(self.prompt.prompt_id, self.generator_id, self.candidate_indices[i])


def candidate_id(prompt_id: str, generator_id: str, index: int) -> str:
    return f"{prompt_id}-{generator_id}-{index}"


@dataclass(frozen=True)
class ImageRecord:
    """An image known by its bytes' sha256, with reward scores and a provenance (where it came from).

    The build's generated candidates (provenance: their ``Lineage``) and the corpus filter's web samples
    (provenance: input shard, key and member) are both image records: ledgers, dead letters and reports handle
    them alike through ``level``, ``record_id``, ``text``, ``provenance`` and ``drop``. Subclasses declare
    ``image_sha256`` and ``scores`` as fields; the base has none, so each keeps its positional field order.
    """

    level: ClassVar[str] = ""  # the ledger level its drops count under

    @property
    def record_id(self) -> str:
        raise NotImplementedError

    @property
    def text(self) -> str:
        """The prompt or caption the rewards scored the image against."""
        raise NotImplementedError

    @property
    def provenance(self) -> Any:
        raise NotImplementedError

    def drop(self, reason: str, stage: str, detail: Any = "") -> "Drop":
        """The ``Drop`` that removes this record (detail cleaned to one line)."""
        return Drop(self.level, reason, self.record_id, stage, one_line(detail))


@dataclass(frozen=True)
class Candidate(ImageRecord):
    """One staged image and its rewards: ``image_uri`` is the staged file, ``image_sha256`` its bytes' hash."""

    level: ClassVar[str] = "candidate"

    candidate_id: str
    prompt_id: str
    prompt: str
    lineage: Lineage
    image_uri: str
    image_sha256: str
    scores: dict[str, float] = field(default_factory=dict)
    # Facts the candidate filters need, computed in the scoring step where the pixels are
    # (transforms/candidate_filters.py): 64-bit difference hash as 16 hex digits ("" = not computed),
    # grey-level standard deviation (0..255 scale) and share of pixels near the dominant colour.
    dhash: str = ""
    grey_sd: Optional[float] = None
    flat_share: Optional[float] = None

    @property
    def record_id(self) -> str:
        return self.candidate_id

    @property
    def text(self) -> str:
        return self.prompt

    @property
    def provenance(self) -> dict[str, Any]:
        return {"kind": "generated", **self.lineage.to_dict()}


@dataclass(frozen=True)
class CorpusRecord(ImageRecord):
    """One web corpus sample (an image and its caption) without pixels, as ``synpref filter`` carries it.

    Provenance: the input shard (URL and its index in the sorted input list), the sample's key and the
    image member's bytes in that shard (``offset``/``size``; the writer copies them from there).
    ``dropped`` is the ``Drop`` that removed it (None while it is kept): a dropped sample keeps its
    scores, so the per-sample index can show them next to the reason.
    """

    level: ClassVar[str] = "sample"

    key: str
    shard_index: int
    source_shard: str
    image_member: str = ""
    offset: int = -1
    size: int = -1
    image_sha256: str = ""
    caption: str = ""
    caption_bytes: bytes = b""
    metadata: str = ""  # the original JSON text ("" when the sample had none)
    width: int = 0
    height: int = 0
    dhash: str = ""  # 64-bit difference hash of the image, 16 hex digits
    scores: dict[str, float] = field(default_factory=dict)
    dropped: Optional["Drop"] = None

    @property
    def record_id(self) -> str:
        return self.key

    @property
    def text(self) -> str:
        return self.caption

    @property
    def provenance(self) -> dict[str, Any]:
        return {"kind": "corpus", "shard": self.source_shard, "key": self.key, "member": self.image_member}

    @property
    def kept(self) -> bool:
        return self.dropped is None

    @property
    def reason(self) -> str:
        return self.dropped.reason if self.dropped else ""

    def drop(self, reason: str, stage: str, detail: Any = "") -> "CorpusRecord":
        """This sample, marked dropped (it still flows on to the index; its ``Drop`` to the dead letters)."""
        return dataclasses.replace(self, dropped=super().drop(reason, stage, detail))


@dataclass(frozen=True)
class RankedCandidate:
    candidate_id: str
    image_uri: str
    image_sha256: str
    rank: int
    phi: float
    scores: dict[str, float]
    lineage: Lineage
    dhash: str = ""  # the candidate's difference hash (16 hex digits), for pair-level near duplicates

    def to_json(self, image_name: str) -> dict[str, Any]:
        return {
            "candidate_id": self.candidate_id,
            "image": image_name,
            "rank": self.rank,
            "phi": self.phi,
            "scores": self.scores,
            "lineage": self.lineage.to_dict(),
        }


@dataclass(frozen=True)
class PreferencePair:
    """An ordered pair: ``winner`` has the higher phi. ``agreement`` is the fraction of
    rewards that score the winner strictly higher than the loser."""

    prompt_id: str
    winner_id: str
    loser_id: str
    phi_winner: float
    phi_loser: float
    agreement: float
    wins: int = 0  # rewards scoring the winner strictly higher: the filter compares these exactly
    n_rewards: int = 0

    @property
    def key(self) -> str:
        return f"{self.winner_id}__{self.loser_id}"


@dataclass(frozen=True)
class RankedGroup:
    """One prompt's candidates in rank order, and the pairs that survived filtering."""

    prompt: PromptRecord
    rewards: tuple[str, ...]
    aggregator: str
    candidates: tuple[RankedCandidate, ...]
    pairs: tuple[PreferencePair, ...] = ()


@dataclass(frozen=True)
class Drop:
    """A record that left the pipeline, with a stable snake_case reason.

    ``level`` says what was dropped (the build's prompt, candidate or pair; the filter's sample) so that
    counts add up per level in the manifest (``accounting.ledger``). Every pipeline writes its dead
    letters as ``to_json()`` lines: one schema, ``DROP_SCHEMA``.
    """

    level: str
    reason: str
    record_id: str
    stage: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """One dead-letter line (no newline)."""
        return json.dumps(self.to_dict(), sort_keys=True)


DROP_SCHEMA = pa.schema(
    [
        ("level", pa.string()),
        ("reason", pa.string()),
        ("record_id", pa.string()),
        ("stage", pa.string()),
        ("detail", pa.string()),
    ]
)

RANKED_INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("category", pa.string()),
        ("num_candidates", pa.int32()),
        ("candidate_ids", pa.list_(pa.string())),
        ("generator_ids", pa.list_(pa.string())),
        ("seeds", pa.list_(pa.int64())),
        ("phi", pa.list_(pa.float64())),
        ("scores_json", pa.string()),
    ]
)

PAIR_INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("winner_id", pa.string()),
        ("loser_id", pa.string()),
        ("phi_winner", pa.float64()),
        ("phi_loser", pa.float64()),
        ("agreement", pa.float64()),
    ]
)
