"""``synpref export --format pickapic``: a build as Pick-a-Pic v2 parquet that `datasets` and DPO trainers read."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import tiny_build_config

# Pick-a-Pic v2, transcribed from the published parquet (Kirstain et al. 2023, arXiv 2305.01569), independently of formats/export.py.
PICKAPIC_V2 = [
    ("caption", "string"),
    ("jpg_0", "binary"), ("jpg_1", "binary"),
    ("label_0", "float64"), ("label_1", "float64"),
    ("model_0", "string"), ("model_1", "string"),
    ("image_0_uid", "string"), ("image_1_uid", "string"),
    ("image_0_url", "string"), ("image_1_url", "string"),
    ("best_image_uid", "string"),
    ("are_different", "bool"), ("has_label", "bool"),
    ("ranking_id", "int64"), ("user_id", "int64"), ("num_example_per_prompt", "int64"),
    ("created_at", "timestamp[ns]"),
]
ARROW_TYPES = {"string": pa.string(), "binary": pa.binary(), "float64": pa.float64(), "bool": pa.bool_(),
               "int64": pa.int64(), "timestamp[ns]": pa.timestamp("ns")}


def synpref(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "synpref.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(demo_models, tmp_path_factory):
    from synpref.pipelines.build_preferences import build
    from synpref.schemas.config import build_config_from_dict

    root = tmp_path_factory.mktemp("export")
    build(build_config_from_dict(tiny_build_config(demo_models, root / "build")))
    proc = synpref("export", "--format", "pickapic", "build", "pickapic", "--rows-per-file", "16", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc.stdout


def build_pairs(build_dir: Path) -> dict:
    """key -> (win pixels, lose pixels) from the build's own pairs shards."""
    from synpref.formats.export import iter_tar_samples
    from synpref.transforms.imageio import decode_members

    out = {}
    for tar in sorted((build_dir / "pairs").glob("pairs-*.tar")):
        for raw in iter_tar_samples(str(tar)):
            s = decode_members(raw)
            out[s["__key__"]] = (np.asarray(s["win.png"], dtype=np.float32), np.asarray(s["lose.png"], dtype=np.float32))
    return out


def decode_jpeg(data: bytes) -> np.ndarray:
    from synpref.transforms.imageio import decode_image

    assert data[:3] == b"\xff\xd8\xff"
    return np.asarray(decode_image(data, formats=("JPEG",)), dtype=np.float32)


def test_export_loads_with_datasets_and_has_the_full_pickapic_schema(exported):
    import datasets

    root, stdout = exported
    manifest = json.loads((root / "build/manifest.json").read_text())
    written = manifest["counts"]["pairs"]["written"]
    assert written > 16  # more than one parquet file
    assert f"rows        {written} (manifest: {written} pairs written)" in stdout

    ds = datasets.load_dataset(str(root / "pickapic"), split="train")
    assert ds.column_names == [name for name, _ in PICKAPIC_V2]
    for name, dtype in PICKAPIC_V2:
        assert ds.features[name] == datasets.Value(dtype), name
    assert ds.num_rows == written

    files = sorted((root / "pickapic/data").glob("*.parquet"))
    assert len(files) == -(-written // 16)
    for f in files:
        schema = pq.read_schema(f)
        assert [(fl.name, fl.type) for fl in schema] == [(n, ARROW_TYPES[t]) for n, t in PICKAPIC_V2]

    card = (root / "pickapic/README.md").read_text()
    assert "config_name: default" in card and "label_0" in card and "sha256" in card


def test_labels_follow_the_winner_which_alternates_between_slots(exported):
    import datasets

    root, _ = exported
    ds = datasets.load_dataset(str(root / "pickapic"), split="train")
    pairs = build_pairs(root / "build")
    assert ds.num_rows == len(pairs)
    seen = set()
    for row in ds:
        assert {row["label_0"], row["label_1"]} == {0.0, 1.0}
        assert row["has_label"] is True and row["user_id"] == 0
        assert row["image_0_url"] is None and row["image_1_url"] is None and row["created_at"] is None
        win_slot = 0 if row["label_0"] == 1.0 else 1
        ids = [row["image_0_uid"], row["image_1_uid"]]
        assert row["best_image_uid"] == ids[win_slot]
        key = f"{ids[win_slot]}__{ids[1 - win_slot]}"
        seen.add(key)
        win, lose = pairs[key]
        jpgs = [decode_jpeg(row["jpg_0"]), decode_jpeg(row["jpg_1"])]
        assert jpgs[0].shape == win.shape
        mad = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
        assert mad(jpgs[win_slot], win) < 6 and mad(jpgs[1 - win_slot], lose) < 6
        assert row["are_different"] == bool(np.any(win != lose))
        if row["are_different"]:
            assert mad(jpgs[win_slot], win) < mad(jpgs[win_slot], lose)
            assert mad(jpgs[1 - win_slot], lose) < mad(jpgs[1 - win_slot], win)
        assert row["model_0"].startswith("tiny-sd-") and row["model_1"].startswith("tiny-sd-")
    assert seen == set(pairs)
    ones = sum(r == 1.0 for r in ds["label_0"])
    assert 0 < ones < ds.num_rows  # the winner is not always in slot 0
    per_prompt = {}
    for cap in ds["caption"]:
        per_prompt[cap] = per_prompt.get(cap, 0) + 1
    assert all(n == per_prompt[c] for c, n in zip(ds["caption"], ds["num_example_per_prompt"]))
    assert len(set(ds["ranking_id"])) == ds.num_rows and min(ds["ranking_id"]) >= 0


def test_a_second_export_writes_the_same_bytes(exported, tmp_path):
    from synpref.formats.export import export

    root, _ = exported
    export("pickapic", str(root / "build"), str(tmp_path / "again"), rows_per_file=16)
    first = {p.relative_to(root / "pickapic"): p.read_bytes() for p in (root / "pickapic").rglob("*") if p.is_file()}
    second = {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert first.keys() == second.keys() and first == second
    # and exporting over an earlier export replaces it whole
    export("pickapic", str(root / "build"), str(tmp_path / "again"), rows_per_file=1000)
    assert [p.name for p in (tmp_path / "again/data").iterdir()] == ["train-00000.parquet"]
    # an interrupted export (data files, no card yet) is replaced too
    (tmp_path / "cut/data").mkdir(parents=True)
    (tmp_path / "cut/data/train-00003.parquet.tmp").write_bytes(b"half")
    export("pickapic", str(root / "build"), str(tmp_path / "cut"), rows_per_file=16)
    assert (tmp_path / "cut/data/train-00000.parquet").read_bytes() == first[Path("data/train-00000.parquet")]
    assert not (tmp_path / "cut/data/train-00003.parquet.tmp").exists()


def test_best_worst_gives_one_row_per_prompt_rank_1_against_rank_k(exported, tmp_path):
    import datasets

    from synpref.formats.export import export
    from synpref.transforms.imageio import decode_members
    from synpref.formats.export import iter_tar_samples

    root, _ = exported
    summary = export("pickapic", str(root / "build"), str(tmp_path / "bw"), pairs="best_worst")
    expected = {}
    for tar in sorted((root / "build/ranked").glob("ranked-*.tar")):
        for raw in iter_tar_samples(str(tar)):
            cands = decode_members(raw)["json"]["candidates"]
            if len(cands) > 1 and cands[0]["phi"] != cands[-1]["phi"]:
                expected[cands[0]["candidate_id"]] = cands[-1]["candidate_id"]
    ds = datasets.load_dataset(str(tmp_path / "bw"), split="train")
    assert ds.num_rows == summary["rows"] == len(expected) > 0
    for row in ds:
        loser = row["image_1_uid"] if row["label_0"] == 1.0 else row["image_0_uid"]
        assert expected[row["best_image_uid"]] == loser and row["num_example_per_prompt"] == 1


def test_registry_and_one_line_errors(exported, tmp_path):
    from synpref.formats.export import EXPORTERS, PickAPicExporter

    assert EXPORTERS["pickapic"] is PickAPicExporter
    root, _ = exported
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "not_empty").mkdir()
    (tmp_path / "not_empty/keep.txt").write_text("x")
    cases = [
        (("--format", "pickapic", str(tmp_path), str(tmp_path / "o1")), "no manifest.json"),
        (("--format", "webp-zip", str(root / "build"), str(tmp_path / "o2")), "unknown format 'webp-zip'"),
        (("--format", "pickapic", str(root / "build"), str(tmp_path / "a_file/out")), "cannot write to"),
        (("--format", "pickapic", str(root / "build"), str(tmp_path / "not_empty")), "not empty"),
    ]
    for args, message in cases:
        proc = synpref("export", *args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr
        assert message in lines[-1] and lines[-1].startswith("synpref export: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o2").exists() and (tmp_path / "not_empty/keep.txt").exists()
