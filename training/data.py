"""Read ranked WebDataset shards into per-prompt training items and variable-k batches.

One sample per prompt: ``<key>.json`` plus ``<key>.img0.png`` ... in rank order. A bad
sample is skipped with a snake_case reason, counted and logged; it never stops training.
Shards are untrusted input: members are read raw (nothing is unpickled), member names are
checked and images decode through ``decode_image`` with a pixel limit.
"""
from __future__ import annotations

import glob
import itertools
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps

from synpref.transforms.imageio import DEFAULT_MAX_PIXELS, ImageDecodeError, check_member_name, decode_image

logger = logging.getLogger("synpref.training")


@dataclass
class RankedItem:
    """One prompt with its k candidates, best first."""

    prompt_id: str
    prompt: str
    images: torch.Tensor  # [k, 3, H, W] in [-1, 1]
    phi: torch.Tensor  # [k] Syn-Pic win rates
    rank: torch.Tensor  # [k] 1-based, 1 = best


@dataclass
class RankedBatch:
    """B prompts flattened to N = sum(k_b) images; ``group`` maps each image to its prompt."""

    prompt_ids: list[str]
    prompts: list[str]  # [B]
    images: torch.Tensor  # [N, 3, H, W]
    phi: torch.Tensor  # [N]
    rank: torch.Tensor  # [N]
    group: torch.Tensor  # [N] long, 0..B-1


class BadSample(ValueError):
    """A sample that cannot be trained on; ``reason`` is a stable snake_case name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def resolve_shards(shards: Iterable[str]) -> list[str]:
    """Expand directories (their ``*.tar``) and globs, local or fsspec URLs, keeping the given order.

    Raises:
        FileNotFoundError: an entry matches no shard (a typo should not train on nothing).
    """
    urls = []
    for entry in shards:
        fs, path = fsspec.core.url_to_fs(entry)
        if fs.isdir(path):
            found = fs.glob(path.rstrip("/") + "/*.tar")
        elif glob.has_magic(path):
            found = fs.glob(path)
        else:
            found = [path] if fs.exists(path) else []
        if not found:
            raise FileNotFoundError(f"no shards found for {entry!r}: give a .tar file, a glob or a directory of .tar")
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        urls += [p if local else fs.unstrip_protocol(p) for p in sorted(found)]
    return urls


def decode_sample(sample: dict, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> RankedItem:
    """Turn one raw WebDataset sample into a ``RankedItem``.

    Raises:
        BadSample: an unsafe member name, missing or malformed JSON, fewer than 2 candidates,
            a missing image, or an image ``decode_image`` refuses (its reason, e.g. ``too_many_pixels``).
    """
    for ext in sample:
        # group_by_keys splits each tar name into __key__ and ext, so this is the member's full name;
        # links and keyless names (".x.png") never get here: webdataset's tar iterator drops them.
        if not ext.startswith("__"):
            try:
                check_member_name(f"{sample.get('__key__')}.{ext}")
            except ValueError as exn:
                raise BadSample("unsafe_member_name", str(exn)) from None
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
    images = []
    for name in names:
        data = sample.get(str(name).lower())
        if data is None:
            raise BadSample("missing_image", str(name))
        try:
            images.append(_image_to_tensor(decode_image(data, max_pixels), resolution))
        except ImageDecodeError as exn:
            raise BadSample(exn.reason, f"{name}: {exn.detail}") from None
    return RankedItem(
        prompt_id=meta.get("prompt_id", sample["__key__"]),
        prompt=prompt,
        images=torch.stack(images),
        phi=torch.tensor(phi, dtype=torch.float32),
        rank=torch.tensor(rank, dtype=torch.long),
    )


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


class RankedShards:
    """Iterable of ``RankedItem`` over ranked shards; iterate again for another epoch.

    Args:
        shards: paths, globs, directories or fsspec URLs (see ``resolve_shards``).
        resolution: square output size in pixels.
        shuffle_seed: ``None`` keeps shard and sample order; an int shuffles both, reproducibly
            (epoch e uses seed + e).
        shuffle_buffer: sample shuffle buffer size.
        process_index, num_processes: each process keeps every num_processes-th item.
        max_image_pixels: larger images skip their sample as ``too_many_pixels`` (decompression bombs).

    Attributes:
        skipped: count of skipped samples per reason, over all epochs.
    """

    def __init__(
        self,
        shards: Iterable[str],
        resolution: int,
        *,
        shuffle_seed: int | None = None,
        shuffle_buffer: int = 100,
        process_index: int = 0,
        num_processes: int = 1,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        self.urls = resolve_shards(shards)
        self.resolution = resolution
        self.shuffle_seed = shuffle_seed
        self.shuffle_buffer = shuffle_buffer
        self.process_index = process_index
        self.num_processes = num_processes
        self.max_image_pixels = max_image_pixels
        self.skipped: Counter[str] = Counter()
        self._epoch = 0

    def __iter__(self) -> Iterator[RankedItem]:
        urls = list(self.urls)
        epoch, self._epoch = self._epoch, self._epoch + 1
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed + epoch).shuffle(urls)
        samples = wds.tariterators.group_by_keys(
            wds.tariterators.tar_file_expander(_open_shards(urls), handler=self._corrupt_shard),
            handler=wds.warn_and_continue,
        )
        if self.shuffle_seed is not None:
            samples = wds.shuffle(self.shuffle_buffer, seed=self.shuffle_seed + epoch)(samples)
        items = (item for item in map(self._decode, samples) if item is not None)
        return itertools.islice(items, self.process_index, None, self.num_processes)

    def _decode(self, sample: dict) -> RankedItem | None:
        try:
            return decode_sample(sample, self.resolution, self.max_image_pixels)
        except BadSample as exn:
            self.skipped[exn.reason] += 1
            logger.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), exn)
            return None

    def _corrupt_shard(self, exn: Exception) -> bool:
        self.skipped["corrupt_shard"] += 1
        logger.warning("skipping the rest of a corrupt shard: %r", exn)
        return True


def collate_ranked(items: list[RankedItem]) -> RankedBatch:
    """Flatten prompts with different k into one image batch plus a prompt index."""
    return RankedBatch(
        prompt_ids=[it.prompt_id for it in items],
        prompts=[it.prompt for it in items],
        images=torch.cat([it.images for it in items]),  # [N, 3, H, W]
        phi=torch.cat([it.phi for it in items]),
        rank=torch.cat([it.rank for it in items]),
        group=torch.cat([torch.full((len(it.phi),), b, dtype=torch.long) for b, it in enumerate(items)]),
    )


def iter_batches(dataset: RankedShards, batch_size: int) -> Iterator[RankedBatch]:
    """Endless batches of ``batch_size`` prompts, repeating the dataset epoch after epoch.

    Raises:
        ValueError: an epoch yields no valid sample (otherwise this would spin forever).
    """
    while True:
        n_items = 0
        it = iter(dataset)
        while chunk := list(itertools.islice(it, batch_size)):
            n_items += len(chunk)
            yield collate_ranked(chunk)
        if n_items == 0:
            raise ValueError(f"no valid samples in {dataset.urls}; skipped: {dict(dataset.skipped)}")
