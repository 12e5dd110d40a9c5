"""Trainer data sources: pairs shards, Pick-a-Pic parquet, pair-agreement masks and per-process shares."""
import io
import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

import synpref.training.data as data_mod
from synpref.training.config import TrainConfig
from synpref.training.data import (PairShards, PickapicParquet, RankedShards, SchemaError, collate_ranked,
                                   iter_batches, open_dataset, prefetch)

SEEDS = iter(range(10_000))


def png(seed: int | None = None, size: int = 16) -> bytes:
    rng = np.random.default_rng(next(SEEDS) if seed is None else seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def as_tensor(image_bytes: bytes, resolution: int = 16) -> torch.Tensor:
    return data_mod._image_to_tensor(Image.open(io.BytesIO(image_bytes)).convert("RGB"), resolution)


def ranked_sample(key: str, scores: list[dict], phis: list[float], rewards: list[str]) -> dict:
    """Candidates in rank order (img0 = best), as transforms/writing.py::ranked_sample writes them."""
    candidates = [{"candidate_id": f"{key}-{i}", "image": f"img{i}.png", "rank": i + 1, "phi": phi,
                   "scores": s, "lineage": {}} for i, (s, phi) in enumerate(zip(scores, phis))]
    meta = {"prompt_id": key, "prompt": f"prompt {key}", "category": "t", "aggregator": "syn_pic",
            "rewards": rewards, "reward_info": {}, "candidates": candidates}
    return {"__key__": key, "json": json.dumps(meta).encode(), **{f"img{i}.png": png() for i in range(len(phis))}}


def write_tar(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


@pytest.fixture
def decoded(monkeypatch):
    """Every byte string the trainer reader hands to decode_image, in order."""
    calls: list[bytes] = []
    real = data_mod.decode_image

    def counting(data, *args, **kwargs):
        calls.append(bytes(data))
        return real(data, *args, **kwargs)

    monkeypatch.setattr(data_mod, "decode_image", counting)
    return calls


# ---- pairs shards -> k = 2 items


def pair_sample(key: str, agreement: float, prompt: str = "a cat") -> dict:
    meta = {"prompt_id": key.split("-")[0], "prompt": prompt, "category": "t", "agreement": agreement,
            "rewards": ["a", "b"], "aggregator": "syn_pic", "reward_info": {},
            "winner": {"candidate_id": key.split("__")[0], "image": "win.png", "rank": 1, "phi": 0.8},
            "loser": {"candidate_id": key.split("__")[1], "image": "lose.png", "rank": 3, "phi": 0.2}}
    return {"__key__": key, "json": json.dumps(meta).encode(), "win.png": png(), "lose.png": png()}


def test_pairs_shard_gives_k2_items(tmp_path, decoded):
    samples = [pair_sample("p1-a__p1-b", 1.0), pair_sample("p1-a__p1-c", 0.5), pair_sample("p2-a__p2-b", 0.75)]
    broken = pair_sample("p3-a__p3-b", 1.0)
    del broken["lose.png"]
    path = write_tar(tmp_path / "pairs-00000.tar", samples + [broken])

    data = PairShards([str(tmp_path)], resolution=16)
    items = list(data)
    assert [it.prompt_id for it in items] == ["p1", "p1", "p2"]
    assert dict(data.skipped) == {"missing_image": 1}
    for item, sample in zip(items, samples):
        assert item.images.shape == (2, 3, 16, 16) and item.prompt == "a cat"
        assert item.phi.tolist() == [1.0, 0.0] and item.rank.tolist() == [1, 2] and item.pair_mask is None
        assert torch.equal(item.images[0], as_tensor(sample["win.png"]))
        assert torch.equal(item.images[1], as_tensor(sample["lose.png"]))
    batch = collate_ranked(items[:2])
    assert batch.group.tolist() == [0, 0, 1, 1] and batch.pair_mask is None

    # min_pair_agreement drops pairs at or below it, before decoding their images
    decoded.clear()
    data = PairShards([path], resolution=16, min_pair_agreement=0.5)
    items = list(data)
    assert [it.prompt_id for it in items] == ["p1", "p2"] and dict(data.skipped) == {"low_agreement": 1, "missing_image": 1}
    assert samples[1]["win.png"] not in decoded and samples[1]["lose.png"] not in decoded
    assert items[0].pair_mask.tolist() == [[False, True], [True, False]]


def test_open_dataset_follows_data_format(tmp_path):
    write_tar(tmp_path / "pairs-00000.tar", [pair_sample("p1-a__p1-b", 1.0)])
    cfg = TrainConfig(pretrained_model="m", shards=[str(tmp_path)], output_dir="o", resolution=16, data_format="pairs")
    reader = open_dataset(cfg)
    assert isinstance(reader, PairShards) and next(iter_batches(reader, 1)).images.shape == (2, 3, 16, 16)
    assert isinstance(open_dataset(TrainConfig(pretrained_model="m", shards=[str(tmp_path / "*.tar")],
                                               output_dir="o", data_format="ranked")), RankedShards)
    # data_format auto (the default) reads the first sample's layout: win/lose images are pairs
    assert isinstance(open_dataset(TrainConfig(pretrained_model="m", shards=[str(tmp_path)], output_dir="o")),
                      PairShards)


# ---- Pick-a-Pic parquet

def pickapic_table(rows) -> pa.Table:
    return pa.table({
        "caption": [r[0] for r in rows],
        "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
        "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
        "label_0": pa.array([r[3] for r in rows], pa.float64()),
        "extra": [1] * len(rows),  # real files carry more columns; the reader asks only for its four
    })


def test_pickapic_parquet_in_order_with_counted_skips(tmp_path, decoded):
    imgs = [png() for _ in range(10)]
    rows = [
        ("cap0", imgs[0], imgs[1], 1.0),         # image 0 preferred
        ("cap1", imgs[2], imgs[3], 0.0),         # image 1 preferred
        ("cap2", imgs[4], imgs[5], 0.5),         # tie: skipped, never decoded
        ("cap3", imgs[6], b"\x89PNG\r\n\x1a\n garbage", 1.0),  # corrupt image
        ("cap4", imgs[7], imgs[8], 1.0),
    ]
    pq.write_table(pickapic_table(rows), tmp_path / "train-0.parquet", row_group_size=2)  # 3 row groups
    assert pq.ParquetFile(tmp_path / "train-0.parquet").num_row_groups == 3

    data = PickapicParquet([str(tmp_path)], resolution=16)
    items = list(data)
    assert [it.prompt_id for it in items] == ["train-0.parquet:0", "train-0.parquet:1", "train-0.parquet:4"]
    assert [it.prompt for it in items] == ["cap0", "cap1", "cap4"]
    assert dict(data.skipped) == {"tie": 1, "corrupt_image": 1}
    expected = [(imgs[0], imgs[1]), (imgs[3], imgs[2]), (imgs[7], imgs[8])]  # preferred first
    for item, (win, lose) in zip(items, expected):
        assert item.phi.tolist() == [1.0, 0.0] and item.rank.tolist() == [1, 2] and item.pair_mask is None
        assert torch.equal(item.images[0], as_tensor(win)) and torch.equal(item.images[1], as_tensor(lose))
    assert imgs[4] not in decoded and imgs[5] not in decoded

    # a file list and a glob work too; a file without the columns is an error, not a silent skip
    assert len(list(PickapicParquet([str(tmp_path / "train-0.parquet")], resolution=16))) == 3
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"missing column\(s\) \['jpg_0', 'jpg_1', 'label_0'\]"):
        list(PickapicParquet([str(tmp_path / "bad.parquet")], resolution=16))


def test_pickapic_reads_hf_image_structs(tmp_path):
    a, b = png(), png()
    table = pa.table({"caption": ["c"], "jpg_0": [{"bytes": a, "path": None}], "jpg_1": [{"bytes": b, "path": None}],
                      "label_0": [0.0]})
    pq.write_table(table, tmp_path / "hf.parquet")
    (item,) = PickapicParquet([str(tmp_path / "*.parquet")], resolution=16)
    assert torch.equal(item.images[0], as_tensor(b))


# ---- min_pair_agreement


REWARDS = ["r1", "r2", "r3", "r4"]
# Rank order: img0 (phi 6/8), img1 (5/8), img2 (0). img0 beats img1 strictly on r2, r3 only (r4 is a tie).
SCORES = [
    {"r1": 0.5, "r2": 0.9, "r3": 0.2, "r4": 0.5},
    {"r1": 0.9, "r2": 0.8, "r3": 0.1, "r4": 0.5},
    {"r1": 0.1, "r2": 0.1, "r3": 0.05, "r4": 0.0},
]
PHIS = [6 / 8, 5 / 8, 0.0]


def hand_mask(meta: dict, threshold: float) -> list[list[bool]]:
    """Pair (i, j) of the rank order: agreement = share of rewards scoring the better-ranked one strictly higher."""
    cands, rewards = meta["candidates"], meta["rewards"]
    k = len(cands)
    mask = [[False] * k for _ in range(k)]
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            w, l = (cands[i], cands[j]) if cands[i]["rank"] < cands[j]["rank"] else (cands[j], cands[i])
            agreement = sum(w["scores"][r] > l["scores"][r] for r in rewards) / len(rewards)
            mask[i][j] = agreement > threshold
    return mask


def test_pair_mask_matches_hand_computation(tmp_path, decoded):
    good = ranked_sample("g1", SCORES, PHIS, REWARDS)
    # every pair with different phi has agreement 0.5: nothing usable at 0.5, skipped before decoding
    weak = ranked_sample("w1", [{"r1": 1, "r2": 0}, {"r1": 0, "r2": 1}], [0.5, 0.5], ["r1", "r2"])
    weak2 = ranked_sample("w2", [{"r1": 1, "r2": 0}, {"r1": 0, "r2": 1}], [0.6, 0.4], ["r1", "r2"])
    no_scores = ranked_sample("n1", [{}, {}], [1.0, 0.0], ["r1"])
    path = write_tar(tmp_path / "ranked-00000.tar", [good, weak, weak2, no_scores])

    data = RankedShards([path], resolution=16, min_pair_agreement=0.5)
    (item,) = list(data)
    meta = json.loads(good["json"])
    expected = hand_mask(meta, 0.5)
    assert expected == [[False, False, True], [False, False, True], [True, True, False]]
    assert item.pair_mask.dtype == torch.bool and item.pair_mask.tolist() == expected
    assert dict(data.skipped) == {"no_agreeing_pairs": 2, "missing_scores": 1}
    for s in (weak, weak2):
        assert s["img0.png"] not in decoded and s["img1.png"] not in decoded

    # a lower threshold keeps the 0.5 pair; the batch mask is block-diagonal over prompts
    low = list(RankedShards([path], resolution=16, min_pair_agreement=0.25))
    assert [it.prompt_id for it in low] == ["g1", "w2"]  # w1: tied phi, no pair for the loss at all
    assert low[0].pair_mask.tolist() == hand_mask(meta, 0.25) == [[False, True, True], [True, False, True],
                                                                  [True, True, False]]
    batch = collate_ranked(low[:2])
    assert batch.pair_mask.shape == (5, 5)
    assert batch.pair_mask[:3, :3].tolist() == hand_mask(meta, 0.25) and not batch.pair_mask[:3, 3:].any()
    assert batch.pair_mask[3:, 3:].tolist() == [[False, True], [True, False]]

    # off (default): no mask anywhere
    off = list(RankedShards([path], resolution=16))
    assert len(off) == 4 and all(it.pair_mask is None for it in off) and collate_ranked(off).pair_mask is None


def test_min_pair_agreement_config():
    base = {"pretrained_model": "m", "shards": ["s"], "output_dir": "o"}
    assert TrainConfig.from_dict(base).min_pair_agreement is None
    assert TrainConfig.from_dict({**base, "min_pair_agreement": "0.5"}).min_pair_agreement == 0.5
    with pytest.raises(ValueError, match=r"min_pair_agreement must be in \[0, 1\)"):
        TrainConfig.from_dict({**base, "min_pair_agreement": 1.0})
    with pytest.raises(ValueError, match="pickapic has none"):
        TrainConfig.from_dict({**base, "min_pair_agreement": 0.5, "data_format": "pickapic"})


# ---- per-process shares


def ranked_shards(tmp_path, n_shards: int, per_shard: int) -> tuple[list[str], dict[bytes, str]]:
    """Shards of 2-image samples; returns the shard paths and image bytes -> sample key."""
    paths, owner = [], {}
    for s in range(n_shards):
        samples = [ranked_sample(f"s{s}k{i}", [{"r": 1}, {"r": 0}], [1.0, 0.0], ["r"]) for i in range(per_shard)]
        for sample in samples:
            owner[sample["img0.png"]] = owner[sample["img1.png"]] = sample["__key__"]
        paths.append(write_tar(tmp_path / f"ranked-{s:05d}.tar", samples))
    return paths, owner


@pytest.mark.parametrize("n_shards,world_size,by_shard", [(4, 2, True), (3, 2, True), (1, 2, False), (2, 3, False)])
@pytest.mark.parametrize("shuffle_seed", [None, 7])
def test_processes_read_disjoint_shares_and_decode_only_theirs(tmp_path, decoded, n_shards, world_size, by_shard,
                                                               shuffle_seed):
    paths, owner = ranked_shards(tmp_path, n_shards, per_shard=5)
    shares = []
    for rank in range(world_size):
        decoded.clear()
        data = RankedShards(paths, resolution=8, rank=rank, world_size=world_size, shuffle_seed=shuffle_seed,
                            shuffle_buffer=3)
        assert data.splits_by_shard is by_shard
        keys = [it.prompt_id for it in data]
        shares.append(keys)
        assert {owner[b] for b in decoded} == set(keys)  # no image of another process's sample was decoded
        assert len(decoded) == 2 * len(keys)
    flat = [k for share in shares for k in share]
    assert len(flat) == len(set(flat)) == len(owner) // 2  # disjoint, and together they cover everything
    assert all(shares)


def test_pickapic_shares_by_row_with_one_file(tmp_path, decoded):
    imgs = [png() for _ in range(10)]
    rows = [(f"c{i}", imgs[2 * i], imgs[2 * i + 1], 1.0) for i in range(5)]
    pq.write_table(pickapic_table(rows), tmp_path / "p.parquet", row_group_size=2)
    shares = []
    for rank in range(2):
        decoded.clear()
        share = [it.prompt for it in PickapicParquet([str(tmp_path)], resolution=8, rank=rank, world_size=2)]
        shares.append(share)
        assert sorted(decoded) == sorted(imgs[2 * int(c[1:]) + j] for c in share for j in (0, 1))
    assert shares == [["c0", "c2", "c4"], ["c1", "c3"]]


def test_old_process_arguments_still_work(tmp_path):
    paths, _ = ranked_shards(tmp_path, 1, per_shard=4)
    data = RankedShards(paths, resolution=8, rank=1, world_size=2)
    assert (data.rank, data.world_size) == (1, 2) and [it.prompt_id for it in data] == ["s0k1", "s0k3"]
    with pytest.raises(ValueError, match="rank < world_size"):
        RankedShards(paths, resolution=8, rank=2, world_size=2)


# ---- resume: jump to a saved data position without decoding what came before it


def batches_with_decodes(reader, decoded, n: int) -> list[tuple[list[str], list[bytes]]]:
    """The first n batches' prompt ids, each with the image bytes decoded while producing it."""
    out, batches = [], iter_batches(reader, batch_size=2)
    for _ in range(n):
        before = len(decoded)
        out.append((next(batches).prompt_ids, decoded[before:]))
    return out


@pytest.mark.parametrize("fmt", ["ranked", "pickapic"])
def test_resume_jumps_to_the_position_without_decoding_earlier_samples(tmp_path, decoded, fmt):
    if fmt == "ranked":  # two shards read by one process, a sample with a missing image, shuffled
        samples = [ranked_sample(f"k{i}", [{"r": 1}, {"r": 0}], [1.0, 0.0], ["r"]) for i in range(7)]
        del samples[3]["img1.png"]
        paths = [write_tar(tmp_path / "a.tar", samples[:4]), write_tar(tmp_path / "b.tar", samples[4:])]

        def reader():
            return RankedShards(paths, resolution=8, shuffle_seed=5, shuffle_buffer=3)
    else:  # one parquet file, rows shared by two processes (rank 1 here), a tie row
        rows = [(f"c{i}", png(), png(), 0.5 if i == 5 else 1.0) for i in range(13)]
        pq.write_table(pickapic_table(rows), tmp_path / "p.parquet", row_group_size=3)

        def reader():
            return PickapicParquet([str(tmp_path)], resolution=8, shuffle_seed=5, shuffle_buffer=3, rank=1,
                                   world_size=2)
    # valid items per epoch: ranked 6 (batches 2, 2, 2), pickapic 5 (rows 1, 3, 7, 9, 11: batches 2, 2, 1);
    # 9 batches cross epoch ends, positions 1..7 include an epoch's last batch and a resume at an epoch end
    straight_reader = reader()
    straight = batches_with_decodes(straight_reader, decoded, 9)
    for position in range(1, 8):  # stop after `position` batches, resume in a fresh reader
        decoded.clear()
        first = reader()
        batches_with_decodes(first, decoded, position)
        state = json.loads(json.dumps(first.state_dict()))  # saved as JSON in the checkpoint
        decoded.clear()
        resumed = reader()
        resumed.load_state_dict(state)
        rest = batches_with_decodes(resumed, decoded, 9 - position)
        assert [ids for ids, _ in rest] == [ids for ids, _ in straight[position:]], position
        # exactly the straight run's later decodes: nothing before the position is decoded again
        assert [d for _, d in rest] == [d for _, d in straight[position:]], position
    assert resumed.skipped == straight_reader.skipped and sum(straight_reader.skipped.values()) >= 2


def test_prefetch_takes_exactly_count_items_with_their_snapshots_and_raises_errors_in_order():
    taken = []

    def source():
        for i in range(10):
            taken.append(i)
            if i == 4:
                raise ValueError("bad shard")
            yield i

    got = list(prefetch(source(), 3, lambda: len(taken)))
    assert got == [(0, 1), (1, 2), (2, 3)] and taken == [0, 1, 2]  # nothing taken ahead of the count
    taken.clear()
    it = prefetch(source(), 10, lambda: len(taken))
    assert [next(it) for _ in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="bad shard"):
        next(it)


def test_proportion_empty_prompts_is_a_seeded_share_per_epoch_independent_of_processes_and_resume(tmp_path):
    paths, _ = ranked_shards(tmp_path, 1, per_shard=100)

    def emptied(epochs=2, **kw):
        reader = RankedShards(paths, resolution=8, empty_prompt_rate=0.2, **kw)
        return [{it.prompt_id for it in reader if it.prompt == ""} for _ in range(epochs)]

    e0, e1 = emptied(empty_prompt_seed=1)
    assert 10 <= len(e0) <= 30 and 10 <= len(e1) <= 30  # 20% of 100 (binomial sd 4)
    assert e0 != e1  # drawn again every epoch, as diffusers' random draw per sample
    assert emptied(empty_prompt_seed=1) == [e0, e1]  # same seed, same choice
    assert emptied(empty_prompt_seed=2)[0] != e0
    # the same prompts whatever the split between processes or the shuffle order
    by_rank = [emptied(empty_prompt_seed=1, rank=r, world_size=2, shuffle_seed=9) for r in (0, 1)]
    assert [a | b for a, b in zip(*by_rank)] == [e0, e1]
    # and after a resume in the middle of epoch 1
    first = RankedShards(paths, resolution=8, empty_prompt_rate=0.2, empty_prompt_seed=1)
    list(first)
    it = iter(first)
    seen = {item.prompt_id for item in itertools.islice(it, 37) if item.prompt == ""}
    resumed = RankedShards(paths, resolution=8, empty_prompt_rate=0.2, empty_prompt_seed=1)
    resumed.load_state_dict(first.state_dict())
    assert seen | {item.prompt_id for item in resumed if item.prompt == ""} == e1
    # untouched prompts keep their text; off by default
    assert all(item.prompt == f"prompt {item.prompt_id}" for item in RankedShards(paths, resolution=8))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="proportion_empty_prompts must be in"):
            TrainConfig(pretrained_model="m", shards=["x"], output_dir="o", proportion_empty_prompts=bad)
    assert open_dataset(TrainConfig(pretrained_model="m", shards=paths, output_dir="o", seed=1,
                                    proportion_empty_prompts=0.2)).empty_prompt_rate == 0.2
