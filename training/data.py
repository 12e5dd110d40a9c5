"""Read training data into per-prompt items and variable-k batches.

Three sources (``TrainConfig.data_format``), all giving ``RankedItem`` so the same losses apply:

* ``RankedShards``: synpref ranked tars, one sample per prompt: ``<key>.json`` plus ``<key>.img0.png`` ...
  in rank order (img0 = best). With ``min_pair_agreement`` each item carries ``pair_mask``.
* ``PairShards``: synpref pairs tars, one sample per pair: ``<key>.json`` (with ``agreement``),
  ``win.png``, ``lose.png``; each is an item with k = 2 (winner phi 1 rank 1, loser phi 0 rank 2).
* ``PickapicParquet``: Pick-a-Pic v2 parquet (``caption``, ``jpg_0``, ``jpg_1`` image bytes,
  ``label_0`` = 1 image 0 preferred, 0 image 1, 0.5 tie: skipped as ``tie``), streamed batch by batch
  within row groups; k = 2 items, preferred image first.

A bad sample is skipped with a snake_case reason, counted and logged; it never stops training.
Shards are untrusted input: members are read raw (nothing is unpickled), member names are
checked and images decode through ``decode_image`` with a pixel limit.

Multi-process training: pass ``rank``/``world_size``; each process reads and decodes only its share
(whole shards when there are at least ``world_size`` of them, else every ``world_size``-th raw sample,
chosen before anything is decoded). Every process must use the same ``shuffle_seed``.

Resume: ``_Reader.state_dict()`` is the data position (epoch, raw samples taken from this epoch's shuffled
stream, skip counts); ``load_state_dict`` makes the next epoch start there. The samples before the position
are read as raw bytes and dropped (the shuffle buffer needs them to reproduce the order), never decoded.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import queue
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
from PIL import Image, ImageOps

from ..core.fileio import expand_locations
from ..core.registry import Registry
from ..formats.pickapic import PICKAPIC_COLUMNS, image_bytes
from ..transforms.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, check_member_name, decode_image

logger = logging.getLogger("synpref.training")

READERS = Registry("data format")  # training.data_format -> reader class



@dataclass
class RankedItem:
    """One prompt with its k candidates, best first."""

    prompt_id: str
    prompt: str
    images: torch.Tensor  # [k, 3, H, W] in [-1, 1]
    phi: torch.Tensor  # [k] Syn-Pic win rates
    rank: torch.Tensor  # [k] 1-based, 1 = best
    # [k, k] bool, symmetric, False on the diagonal: pair_mask[i, j] = the pair (i, j) may enter the loss
    # (its reward agreement > min_pair_agreement). None when min_pair_agreement is off (every pair usable).
    pair_mask: torch.Tensor | None = None


@dataclass
class RankedBatch:
    """B prompts flattened to N = sum(k_b) images; ``group`` maps each image to its prompt."""

    prompt_ids: list[str]
    prompts: list[str]  # [B]
    images: torch.Tensor  # [N, 3, H, W]
    phi: torch.Tensor  # [N]
    rank: torch.Tensor  # [N]
    group: torch.Tensor  # [N] long, 0..B-1
    # [N, N] bool, block-diagonal over prompts (False across prompts and on the diagonal);
    # None when no item has a mask (min_pair_agreement off). The loss must skip pairs where it is False.
    pair_mask: torch.Tensor | None = None


class TrainInputError(ValueError):
    """A mistake in the training data or settings found during a run (no usable sample, a changed config on
    resume): ``synpref train`` reports it as one line, exit 2, like a config error."""


class SchemaError(TrainInputError):
    """A whole input file has the wrong layout (e.g. parquet without the Pick-a-Pic columns): not skippable."""


class BadSample(ValueError):
    """A sample that cannot be trained on; ``reason`` is a stable snake_case name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def resolve_shards(shards: Iterable[str], ext: str = "tar") -> list[str]:
    """Expand directories (their ``*.<ext>``) and globs, local or fsspec URLs, keeping the given order.

    Raises:
        FileNotFoundError: an entry matches no shard (a typo should not train on nothing).
    """
    return expand_locations(shards, ext)


def _check_names(sample: dict) -> None:
    for ext in sample:
        # group_by_keys splits each tar name into __key__ and ext, so this is the member's full name;
        # links and keyless names (".x.png") never get here: webdataset's tar iterator drops them.
        if not ext.startswith("__"):
            try:
                check_member_name(f"{sample.get('__key__')}.{ext}")
            except ValueError as exn:
                raise BadSample("unsafe_member_name", str(exn)) from None


def _decode_images(sample: dict, names: list, resolution: int, max_pixels: int) -> torch.Tensor:
    images = []
    for name in names:
        data = sample.get(str(name).lower())
        if data is None:
            raise BadSample("missing_image", str(name))
        try:
            images.append(_image_to_tensor(decode_image(data, max_pixels), resolution))
        except ImageDecodeError as exn:
            raise BadSample(exn.reason, f"{name}: {exn.detail}") from None
    return torch.stack(images)


def agreement_matrix(scores: np.ndarray) -> np.ndarray:
    """A[i, j] = fraction of rewards scoring i strictly above j (``transforms.ranking.pair_agreement``)."""
    s = np.asarray(scores, dtype=np.float64)  # [k, n_rewards]
    return (s[:, None, :] > s[None, :, :]).sum(axis=2) / float(s.shape[1])


def ranked_pair_mask(meta: dict, phi: list[float], rank: list[int], min_agreement: float) -> torch.Tensor:
    """[k, k] bool: True where the pair's agreement > ``min_agreement`` (the build's pair agreement).

    A pair is oriented as the build orients it: winner = higher phi, equal phi broken by rank; its
    agreement is the fraction of rewards (``meta["rewards"]``, else the candidates' score keys) scoring the
    winner strictly higher. Symmetric; the diagonal is False.

    Raises:
        BadSample: ``missing_scores`` when a candidate lacks a numeric score for some reward.
    """
    candidates = meta["candidates"]
    try:
        rewards = list(meta.get("rewards") or sorted(candidates[0]["scores"]))
        scores = np.array([[float(c["scores"][r]) for r in rewards] for c in candidates], dtype=np.float64)
    except (KeyError, TypeError, ValueError, IndexError) as exn:
        raise BadSample("missing_scores", repr(exn)) from None
    if not rewards:
        raise BadSample("missing_scores", "no rewards")
    agree = agreement_matrix(scores)
    k = len(candidates)
    order = {i: (-phi[i], rank[i], i) for i in range(k)}  # smaller = winner
    keep = torch.zeros((k, k), dtype=torch.bool)
    for i in range(k):
        for j in range(k):
            if i != j:
                w, l = (i, j) if order[i] < order[j] else (j, i)
                keep[i, j] = bool(agree[w, l] > min_agreement)
    return keep


def decode_sample(
    sample: dict, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS, min_pair_agreement: float | None = None
) -> RankedItem:
    """Turn one raw ranked WebDataset sample into a ``RankedItem``.

    With ``min_pair_agreement`` the item carries ``pair_mask``; a sample where no pair with different phi
    survives is skipped as ``no_agreeing_pairs`` (before its images are decoded).

    Raises:
        BadSample: an unsafe member name, missing or malformed JSON, fewer than 2 candidates,
            a missing image, or an image ``decode_image`` refuses (its reason, e.g. ``too_many_pixels``);
            with ``min_pair_agreement``, also ``missing_scores`` and ``no_agreeing_pairs``.
    """
    _check_names(sample)
    if "json" not in sample:
        raise BadSample("missing_json")
    try:
        meta = json.loads(sample["json"])
        prompt, candidates = meta["prompt"], meta["candidates"]
        phi = [float(c["phi"]) for c in candidates]
        rank = [int(c["rank"]) for c in candidates]
        names = [c["image"] for c in candidates]
    except (ValueError, KeyError, TypeError) as exn:
        raise BadSample("bad_json", repr(exn)) from None
    if not isinstance(prompt, str):
        raise BadSample("bad_json", "prompt is not a string")
    if len(candidates) < 2:
        raise BadSample("too_few_images", f"{len(candidates)} candidate(s)")
    if not all(0.0 <= p <= 1.0 for p in phi):
        raise BadSample("bad_phi", str(phi))
    mask = None
    if min_pair_agreement is not None:
        mask = ranked_pair_mask(meta, phi, rank, min_pair_agreement)
        phi_t = torch.tensor(phi)
        if not (mask & (phi_t[:, None] != phi_t[None, :])).any():
            raise BadSample("no_agreeing_pairs", f"no pair with different phi has agreement > {min_pair_agreement}")
    return RankedItem(
        prompt_id=meta.get("prompt_id", sample["__key__"]),
        prompt=prompt,
        images=_decode_images(sample, names, resolution, max_pixels),
        phi=torch.tensor(phi, dtype=torch.float32),
        rank=torch.tensor(rank, dtype=torch.long),
        pair_mask=mask,
    )


def _pair_item(prompt_id: str, prompt: str, images: torch.Tensor, masked: bool) -> RankedItem:
    """k = 2: image 0 preferred (phi 1, rank 1), image 1 not (phi 0, rank 2)."""
    return RankedItem(
        prompt_id=prompt_id,
        prompt=prompt,
        images=images,
        phi=torch.tensor([1.0, 0.0]),
        rank=torch.tensor([1, 2]),
        pair_mask=~torch.eye(2, dtype=torch.bool) if masked else None,
    )


def decode_pair_sample(
    sample: dict, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS, min_pair_agreement: float | None = None
) -> RankedItem:
    """One synpref pairs sample (``json`` with ``prompt`` and ``agreement``, ``win.png``, ``lose.png``) -> k = 2 item.

    Raises:
        BadSample: as ``decode_sample``; ``low_agreement`` when ``agreement <= min_pair_agreement``
            (checked before the images are decoded).
    """
    _check_names(sample)
    if "json" not in sample:
        raise BadSample("missing_json")
    try:
        meta = json.loads(sample["json"])
        prompt = meta["prompt"]
        names = [meta.get("winner", {}).get("image", "win.png"), meta.get("loser", {}).get("image", "lose.png")]
        agreement = meta.get("agreement")
        agreement = None if agreement is None else float(agreement)
    except (ValueError, KeyError, TypeError, AttributeError) as exn:
        raise BadSample("bad_json", repr(exn)) from None
    if not isinstance(prompt, str):
        raise BadSample("bad_json", "prompt is not a string")
    if min_pair_agreement is not None:
        if agreement is None:
            raise BadSample("missing_scores", "no agreement in the pair's json")
        if agreement <= min_pair_agreement:
            raise BadSample("low_agreement", f"{agreement} <= {min_pair_agreement}")
    images = _decode_images(sample, names, resolution, max_pixels)
    return _pair_item(meta.get("prompt_id", sample["__key__"]), prompt, images, min_pair_agreement is not None)


def decode_pickapic_row(row: dict, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> RankedItem:
    """One Pick-a-Pic row -> k = 2 item, preferred image first. Labels are checked before any decoding.

    Raises:
        BadSample: ``tie`` (label_0 = 0.5), ``bad_label`` (anything but 0, 0.5, 1), ``missing_image``
            or the image's ``decode_image`` reason (``corrupt_image``, ``not_an_image``, ``too_many_pixels``).
    """
    label = row.get("label_0")
    if isinstance(label, (int, float)) and not isinstance(label, bool) and label == 0.5:
        raise BadSample("tie")
    if not isinstance(label, (int, float)) or isinstance(label, bool) or label not in (0, 1):
        raise BadSample("bad_label", repr(label))
    order = ("jpg_0", "jpg_1") if label == 1 else ("jpg_1", "jpg_0")
    images = []
    for col in order:
        data = image_bytes(row.get(col))
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise BadSample("missing_image", col)
        try:
            images.append(_image_to_tensor(decode_image(bytes(data), max_pixels), resolution))
        except ImageDecodeError as exn:
            raise BadSample(exn.reason, f"{col}: {exn.detail}") from None
    caption = row.get("caption")
    return _pair_item(row["__key__"], caption if isinstance(caption, str) else "", torch.stack(images), False)


def _image_to_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> [3, res, res] in [-1, 1]: resize the short side, centre-crop (as diffusers scripts)."""
    img = ImageOps.fit(img, (resolution, resolution), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1)


def _open_shards(urls: Iterable[str]) -> Iterator[dict]:
    """fsspec opener for webdataset's tar expander, so every fsspec URL works (wds' gopen knows few schemes)."""
    for url in urls:
        with fsspec.open(url, "rb") as stream:
            yield {"url": url, "stream": stream}


class _Reader:
    """Shared machinery: shard resolution, per-process split, shuffling, counted skips, epochs.

    Args:
        shards: paths, globs, directories or fsspec URLs (see ``resolve_shards``).
        resolution: square output size in pixels.
        shuffle_seed: ``None`` keeps shard and sample order; an int shuffles both, reproducibly
            (epoch e uses seed + e). Every process must get the same seed.
        shuffle_buffer: sample shuffle buffer size.
        rank, world_size: this process's index and the number of processes. With at least
            ``world_size`` shards, process r reads shards r, r + world_size, ... (of this epoch's order);
            with fewer, every process reads all shards but keeps only raw samples with
            index % world_size == rank, before decoding anything. Shares are disjoint and cover everything.
        max_image_pixels: larger images skip their sample as ``too_many_pixels`` (decompression bombs).
        min_pair_agreement: ``None`` or the agreement at or below which pairs leave the loss.
        empty_prompt_rate, empty_prompt_seed: the share of items whose prompt becomes ``""`` (see
            ``drops_prompt``), and the seed of that draw.
        holdout, keep_holdout: with ``holdout`` > 0, a sample whose ``split_key`` hashes below it
            (``in_holdout``) is held out for validation: dropped undecoded (counted in ``held_out``, not a skip)
            unless ``keep_holdout``, which keeps only those. A hash, so the split is the same on any number of
            processes and after a resume.

    Attributes:
        urls: the resolved shard list (all processes').
        skipped: count of this process's skipped samples per reason, over all epochs.
    """

    extension = "tar"

    def __init__(
        self,
        shards: Iterable[str],
        resolution: int,
        *,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = 100,
        rank: int = 0,
        world_size: int = 1,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        min_pair_agreement: float | None = None,
        empty_prompt_rate: float = 0.0,
        empty_prompt_seed: int = 0,
        holdout: float = 0.0,
        keep_holdout: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.urls = resolve_shards(shards, self.extension)
        self.resolution = resolution
        self.shuffle_seed = shuffle_seed
        self.shuffle_buffer = shuffle_buffer
        self.rank = rank
        self.world_size = world_size
        self.max_image_pixels = max_image_pixels
        self.min_pair_agreement = min_pair_agreement
        self.empty_prompt_rate = empty_prompt_rate
        self.empty_prompt_seed = empty_prompt_seed
        self.holdout = holdout
        self.keep_holdout = keep_holdout
        self.held_out = 0  # samples this process left out by the split (on the other side of it), all epochs
        self.skipped: Counter[str] = Counter()
        self._epoch = 0  # the epoch the next iter() starts
        self._skip = 0  # raw samples the next iter() drops undecoded (set by load_state_dict)
        self._position = {"epoch": 0, "samples": 0}  # of the epoch being iterated
        self._replaying = False  # while dropping: corrupt shards were counted before the checkpoint

    @property
    def splits_by_shard(self) -> bool:
        """True: each process reads whole shards; False: every process reads all, keeps its sample indices."""
        return len(self.urls) >= self.world_size

    @property
    def resume_skip(self) -> int:
        """Raw samples the next ``iter()`` drops undecoded (0 unless ``load_state_dict`` set a position)."""
        return self._skip

    def state_dict(self) -> dict:
        """The data position after the last item yielded: ``{"epoch", "samples", "skipped"}``, JSON-able.

        ``samples`` counts this process's raw samples taken from the epoch's shuffled stream, bad ones included.
        """
        position = self._position if self._skip == 0 else {"epoch": self._epoch, "samples": self._skip}
        return {**position, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``'s position: the next ``iter()`` is that epoch, past its first samples."""
        self._epoch, self._skip = int(state["epoch"]), int(state["samples"])
        self._position = {"epoch": self._epoch, "samples": self._skip}
        self.skipped = Counter(state.get("skipped", {}))

    def __iter__(self) -> Iterator[RankedItem]:
        urls = list(self.urls)
        epoch, self._epoch = self._epoch, self._epoch + 1
        skip, self._skip = self._skip, 0
        self._position = {"epoch": epoch, "samples": skip}
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed + epoch).shuffle(urls)
        if self.splits_by_shard:
            urls = urls[self.rank::self.world_size]
        samples = self._raw_samples(urls)
        if not self.splits_by_shard:
            samples = itertools.islice(samples, self.rank, None, self.world_size)  # raw bytes, not decoded yet
        if self.shuffle_seed is not None:
            samples = wds.shuffle(self.shuffle_buffer, seed=self.shuffle_seed + epoch)(samples)
        if skip:
            samples = self._drop(samples, skip)
        return (item for item in map(self._decode, samples) if item is not None)

    def _drop(self, samples: Iterator[dict], n: int) -> Iterator[dict]:
        """``samples`` without its first ``n`` (read, not decoded): the resume position of this epoch."""
        self._replaying = True
        try:
            for _ in itertools.islice(samples, n):
                pass
        finally:
            self._replaying = False
        yield from samples

    def _raw_samples(self, urls: list[str]) -> Iterator[dict]:
        """Raw samples (``__key__``, ``__url__``, member bytes) of ``urls`` in order; nothing decoded."""
        return wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander(_open_shards(urls), handler=self._corrupt_shard),
            handler=wds.warn_and_continue,
        )

    def decode(self, sample: dict) -> RankedItem:
        raise NotImplementedError

    def split_key(self, sample: dict) -> str:
        """What the validation split hashes: the prompt id (all of a prompt's samples fall on one side)."""
        try:
            meta = json.loads(sample["json"])
            return str(meta.get("prompt_id") or sample["__key__"]) if isinstance(meta, dict) else sample["__key__"]
        except (KeyError, ValueError, TypeError):
            return str(sample.get("__key__"))  # a bad sample: decode skips it with its reason on either side

    def _decode(self, sample: dict) -> RankedItem | None:
        self._position["samples"] += 1
        if self.holdout > 0 and in_holdout(self.split_key(sample), self.holdout) != self.keep_holdout:
            self.held_out += 1
            return None
        try:
            item = self.decode(sample)
        except BadSample as exn:
            self.skipped[exn.reason] += 1
            logger.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), exn)
            return None
        if drops_prompt(self.empty_prompt_seed, self._position["epoch"], item.prompt_id, self.empty_prompt_rate):
            item.prompt = ""
        return item

    def _corrupt_shard(self, exn: Exception) -> bool:
        if self._replaying:  # already counted (and restored from the checkpoint)
            return True
        self.skipped["corrupt_shard"] += 1
        logger.warning("skipping the rest of a corrupt shard: %r", exn)
        return True


def in_holdout(key: str, fraction: float) -> bool:
    """Whether the prompt ``key`` belongs to the held-out ``fraction`` (validation_fraction): a hash of the key
    alone, so it does not depend on the seed, the read order, the process count or a resume."""
    digest = hashlib.sha256(f"synpref-validation:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def drops_prompt(seed: int, epoch: int, prompt_id: str, rate: float) -> bool:
    """Whether this prompt trains unconditionally (empty prompt) in this epoch: true for a ``rate`` share.

    A hash of (seed, epoch, prompt id), not a random stream, so the choice does not depend on the order
    samples are read in, on how they are split between processes, or on where a run resumed.
    """
    if rate <= 0.0:
        return False
    digest = hashlib.sha256(f"{seed}:{epoch}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


@READERS.register("ranked", attribute=None)
class RankedShards(_Reader):
    """Iterable of ``RankedItem`` over synpref ranked shards; iterate again for another epoch (see ``_Reader``).

    With ``min_pair_agreement`` every item has ``pair_mask`` (``ranked_pair_mask``); samples with no
    usable pair left are skipped as ``no_agreeing_pairs``.
    """

    def decode(self, sample: dict) -> RankedItem:
        return decode_sample(sample, self.resolution, self.max_image_pixels, self.min_pair_agreement)


@READERS.register("pairs", attribute=None)
class PairShards(_Reader):
    """Iterable of k = 2 ``RankedItem`` over synpref pairs shards (see ``_Reader``, ``decode_pair_sample``)."""

    def decode(self, sample: dict) -> RankedItem:
        return decode_pair_sample(sample, self.resolution, self.max_image_pixels, self.min_pair_agreement)


def read_pickapic_schema(url: str) -> list[str]:
    """The Pick-a-Pic columns ``url`` lacks (reads the parquet footer only)."""
    with fsspec.open(url, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    return [c for c in PICKAPIC_COLUMNS if c not in names]


@READERS.register("pickapic", attribute=None)
class PickapicParquet(_Reader):
    """Iterable of k = 2 ``RankedItem`` over Pick-a-Pic v2 parquet files (see ``_Reader``, ``decode_pickapic_row``).

    Files are streamed in batches of ``batch_rows`` within row groups: a file is never read whole. Item
    ``prompt_id`` is ``<file name>:<row>``. ``min_pair_agreement`` must be ``None`` (no reward scores).

    Raises (while iterating):
        SchemaError: a file lacks one of the Pick-a-Pic columns (``preflight_train`` reports it earlier).
    """

    extension = "parquet"
    batch_rows = 64

    def __init__(self, shards: Iterable[str], resolution: int, **kwargs):
        super().__init__(shards, resolution, **kwargs)
        if self.min_pair_agreement is not None:
            raise ValueError("min_pair_agreement needs reward scores; Pick-a-Pic parquet has none")

    def _raw_samples(self, urls: list[str]) -> Iterator[dict]:
        for url in urls:
            name = os.path.basename(url.rstrip("/"))
            try:
                with fsspec.open(url, "rb") as f:
                    pf = pq.ParquetFile(f)
                    missing = [c for c in PICKAPIC_COLUMNS if c not in pf.schema_arrow.names]
                    if missing:
                        raise SchemaError(f"{url}: missing column(s) {missing}; "
                                         f"expected the Pick-a-Pic v2 schema {list(PICKAPIC_COLUMNS)}")
                    row = 0
                    for batch in pf.iter_batches(batch_size=self.batch_rows, columns=list(PICKAPIC_COLUMNS)):
                        for values in batch.to_pylist():
                            yield {"__key__": f"{name}:{row}", "__url__": url, **values}
                            row += 1
            except SchemaError:
                raise
            except (ValueError, OSError) as exn:  # not parquet, truncated (pyarrow's ArrowInvalid is a ValueError)
                self._corrupt_shard(exn)

    def decode(self, sample: dict) -> RankedItem:
        return decode_pickapic_row(sample, self.resolution, self.max_image_pixels)

    def split_key(self, sample: dict) -> str:
        """The caption: Pick-a-Pic rows have no prompt id, and one caption has many rows."""
        caption = sample.get("caption")
        return caption if isinstance(caption, str) else str(sample.get("__key__"))




def open_dataset(config, rank: int = 0, world_size: int = 1) -> _Reader:
    """The reader ``config.data_format`` names, set up from a ``TrainConfig`` for process ``rank`` of ``world_size``.

    With ``validation_fraction`` the held-out prompts are left out (``open_validation`` reads them).
    """
    return _reader_class(config)(
        config.shards,
        config.resolution,
        shuffle_seed=config.seed if config.shuffle else None,
        shuffle_buffer=config.shuffle_buffer,
        rank=rank,
        world_size=world_size,
        max_image_pixels=config.max_image_pixels,
        min_pair_agreement=config.min_pair_agreement,
        empty_prompt_rate=config.proportion_empty_prompts,
        empty_prompt_seed=config.seed,
        holdout=getattr(config, "validation_fraction", 0.0),
    )


def open_validation(config) -> _Reader | None:
    """The held-out validation prompts, all of them, in file order (every process reads the same), or ``None``.

    ``validation_shards`` when given, else the ``validation_fraction`` of ``shards`` that ``open_dataset`` leaves out.
    No shuffling and no empty prompts: each evaluation sees the same items.
    """
    if getattr(config, "validation_shards", None):
        shards, holdout = config.validation_shards, 0.0
    elif getattr(config, "validation_fraction", 0.0) > 0:
        shards, holdout = config.shards, config.validation_fraction
    else:
        return None
    return _reader_class(config)(shards, config.resolution, max_image_pixels=config.max_image_pixels,
                                 min_pair_agreement=config.min_pair_agreement, holdout=holdout, keep_holdout=True)


def _reader_class(config) -> type[_Reader]:
    data_format = config.data_format
    if data_format == "auto":
        from .preflight import detect_data_format

        data_format = detect_data_format(config.shards)
    try:
        return READERS[data_format]
    except KeyError:
        raise ValueError(f"unknown data_format {config.data_format!r}; valid: {sorted(READERS)}") from None


def collate_ranked(items: list[RankedItem]) -> RankedBatch:
    """Flatten prompts with different k into one image batch plus a prompt index (and the pair masks, block-diagonal)."""
    pair_mask = None
    if any(it.pair_mask is not None for it in items):
        pair_mask = torch.block_diag(*[
            it.pair_mask if it.pair_mask is not None else ~torch.eye(len(it.phi), dtype=torch.bool) for it in items
        ])
    return RankedBatch(
        prompt_ids=[it.prompt_id for it in items],
        prompts=[it.prompt for it in items],
        images=torch.cat([it.images for it in items]),  # [N, 3, H, W]
        phi=torch.cat([it.phi for it in items]),
        rank=torch.cat([it.rank for it in items]),
        group=torch.cat([torch.full((len(it.phi),), b, dtype=torch.long) for b, it in enumerate(items)]),
        pair_mask=pair_mask,
    )


def iter_batches(dataset: _Reader, batch_size: int) -> Iterator[RankedBatch]:
    """Endless batches of ``batch_size`` prompts, repeating the dataset epoch after epoch.

    Raises:
        TrainInputError: an epoch yields no valid sample (otherwise this would spin forever), or a whole
            epoch holds fewer prompts than ``batch_size`` (found before the first batch is trained on).
    """
    while True:
        n_items = dataset.resume_skip  # > 0 when resuming mid-epoch: that epoch had valid items
        it = iter(dataset)
        while chunk := list(itertools.islice(it, batch_size)):
            n_items += len(chunk)
            if n_items < batch_size:  # the first chunk of an epoch came back short: the epoch has ended
                share = f" (this process's share of {dataset.world_size})" if dataset.world_size > 1 else ""
                raise TrainInputError(f"batch_size {batch_size} is larger than the data: {dataset.urls} hold "
                                      f"{n_items} usable prompt(s){share}; lower batch_size")
            yield collate_ranked(chunk)
        if n_items == 0:
            held = f"; held out for validation: {dataset.held_out}" if dataset.held_out else ""
            raise TrainInputError(f"no usable sample in {dataset.urls} (skipped: {dict(dataset.skipped)}{held}): "
                                  "give ranked or pairs shards from synpref build, or Pick-a-Pic parquet")


def prefetch(items: Iterator, count: int, snapshot: Callable[[], object], depth: int = 2) -> Iterator[tuple]:
    """``(item, snapshot())`` for the next ``count`` items of ``items``, made by a background thread that runs
    up to ``depth`` items ahead, so reading and decoding the next batch overlaps the training step.

    ``snapshot`` runs in that thread right after its item is made (e.g. the reader's position for a
    checkpoint, which must not include items made ahead). Exactly ``count`` items are taken, so nothing is
    decoded beyond what is used. An exception in the thread is raised here, at the item it replaced.
    """
    done = object()
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                buffer.put(value, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for _ in range(count):
                if not put((next(items), snapshot())):
                    return
            put(done)
        except BaseException as exn:  # handed to the consumer, raised in the training loop
            put(exn)

    thread = threading.Thread(target=produce, name="synpref-prefetch", daemon=True)
    thread.start()
    try:
        while (value := buffer.get()) is not done:
            if isinstance(value, BaseException):
                raise value
            yield value
    finally:  # the consumer stopped early (an error in training): let the thread end
        stop.set()
