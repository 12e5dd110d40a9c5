"""`synpref train` mistakes and failures through the real CLI: a user mistake is one line and exit 2 (before
the models load where it can be found there), a failed run is one line naming the part that failed and exit 1;
never a traceback without -v."""
import errno
import io
import json
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from synpref.cli import main
from trainer_fixtures import model_dir, one_thread, write_ranked_shard  # noqa: F401 (fixtures)

PROMPTS = [("a1", "a red cube", [1.0, 0.5, 0.0]), ("a2", "two cats", [0.75, 0.25]), ("a3", "a car", [0.9, 0.1])]


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranked")
    write_ranked_shard(out / "ranked-00000.tar", PROMPTS, np.random.default_rng(0))
    return out


def run(tmp_path, capsys, model_dir, shards, *sets, **values):
    """``synpref train`` on a config written to ``tmp_path``; returns (exit code, stderr)."""
    cfg = {"pretrained_model": str(model_dir), "shards": [str(shards)], "output_dir": str(tmp_path / "out"),
           "resolution": 32, "batch_size": 2, "max_steps": 1, "learning_rate": 1e-3, **values}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = main(["train", "--config", str(tmp_path / "train.yaml"), *[a for s in sets for a in ("--set", s)]])
    return code, capsys.readouterr().err


def mistake(code, err, *words) -> str:
    """Exit 2, one line on stderr, no traceback: the line."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synpref train: "), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def failure(code, err, *words) -> str:
    """Exit 1, no traceback, exactly one 'synpref train:' line (after the run's log lines), last."""
    assert code == 1, err
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("synpref train:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def checkpointed(model_dir, ranked, tmp_path_factory):
    """An output folder with checkpoint-1, trained through the CLI."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cfg = {"pretrained_model": str(model_dir), "shards": [str(ranked)], "output_dir": str(tmp / "out"),
           "resolution": 32, "batch_size": 2, "max_steps": 1, "learning_rate": 1e-3, "checkpointing_steps": 1}
    (tmp / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp / "train.yaml")]) == 0
    assert (tmp / "out" / "checkpoint-1" / "training_state.json").is_file()
    return tmp / "out"


def test_resume_after_a_config_change(checkpointed, model_dir, ranked, tmp_path, capsys):
    shutil.copytree(checkpointed, tmp_path / "out")
    code, err = run(tmp_path, capsys, model_dir, ranked, checkpointing_steps=1, max_steps=2,
                    resume_from_checkpoint="latest", learning_rate=5e-3)
    mistake(code, err, "checkpoint-1", "different config")
    assert "model family" not in err  # refused before the models load


def test_truncated_training_state(checkpointed, model_dir, ranked, tmp_path, capsys):
    shutil.copytree(checkpointed, tmp_path / "out")
    state = tmp_path / "out" / "checkpoint-1" / "training_state.json"
    state.write_bytes(state.read_bytes()[:20])
    code, err = run(tmp_path, capsys, model_dir, ranked, checkpointing_steps=1, max_steps=2,
                    resume_from_checkpoint="latest")
    mistake(code, err, "training_state.json is unreadable")


def test_non_finite_learning_rate(model_dir, ranked, tmp_path, capsys):
    mistake(*run(tmp_path, capsys, model_dir, ranked, "learning_rate=nan"), "learning_rate must be a finite number")
    mistake(*run(tmp_path, capsys, model_dir, ranked, learning_rate=float("inf")), "learning_rate", "finite")


def test_missing_resume_checkpoint_path(model_dir, ranked, tmp_path, capsys):
    code, err = run(tmp_path, capsys, model_dir, ranked, resume_from_checkpoint=str(tmp_path / "checkpoint-9"))
    mistake(code, err, "checkpoint-9", "not a complete checkpoint")


def test_empty_pretrained_model_folder(ranked, tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    mistake(*run(tmp_path, capsys, tmp_path / "empty-model", ranked), "empty-model", "model_index.json")


def test_shards_of_a_corpus_not_a_build(model_dir, tmp_path, capsys):
    """An image-text corpus (img2dataset / filter output layout: jpg, txt, json) has no ranked fields."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    (tmp_path / "corpus").mkdir()
    with wds.TarWriter(str(tmp_path / "corpus" / "00000.tar"), mtime=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": "a red square",
                        "json": json.dumps({"caption": "a red square", "width": 32}).encode()})
    mistake(*run(tmp_path, capsys, model_dir, tmp_path / "corpus"), "neither ranked", "00000.tar")


def test_ranked_shards_without_one_usable_sample(model_dir, tmp_path, capsys):
    """The right layout, but every sample is unusable (one candidate each): found by the run, exit 2."""
    write_ranked_shard(tmp_path / "ranked-00000.tar", [("b1", "x", [1.0]), ("b2", "y", [0.5])],
                       np.random.default_rng(1))
    code, err = run(tmp_path, capsys, model_dir, tmp_path / "ranked-00000.tar")
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("synpref train: no usable sample") and "too_few_images" in line


def pickapic(path, rows):
    table = pa.table({"caption": [r[0] for r in rows], "jpg_0": [r[1] for r in rows],
                      "jpg_1": [r[2] for r in rows], "label_0": [r[3] for r in rows]},
                     schema=pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                                       ("label_0", pa.float64())]))
    pq.write_table(table, path)


def jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_empty_pickapic_parquet(model_dir, tmp_path, capsys):
    (tmp_path / "pap").mkdir()
    pickapic(tmp_path / "pap" / "train-0.parquet", [])
    mistake(*run(tmp_path, capsys, model_dir, tmp_path / "pap", data_format="pickapic"), "no rows")


def test_all_invalid_pickapic_parquet(model_dir, tmp_path, capsys):
    (tmp_path / "pap").mkdir()
    pickapic(tmp_path / "pap" / "train-0.parquet", [("a", jpeg((1, 2, 3)), jpeg((4, 5, 6)), 0.5),
                                                    ("b", b"not an image", jpeg((4, 5, 6)), 1.0)])
    code, err = run(tmp_path, capsys, model_dir, tmp_path / "pap", data_format="pickapic")
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("synpref train: no usable sample") and "tie" in line


def test_parquet_folder_is_detected_as_pickapic(model_dir, tmp_path, capsys):
    (tmp_path / "pap").mkdir()
    pickapic(tmp_path / "pap" / "train-0.parquet", [("a red cube", jpeg((200, 0, 0)), jpeg((0, 0, 200)), 1.0),
                                                    ("a blue cube", jpeg((0, 0, 200)), jpeg((200, 0, 0)), 0.0)])
    code, err = run(tmp_path, capsys, model_dir, tmp_path / "pap")  # no data_format
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["config"]["data_format"] == "pickapic" and summary["steps"] == 1 and summary["skipped"] == {}


def test_resolution_not_a_multiple_of_8(model_dir, ranked, tmp_path, capsys):
    mistake(*run(tmp_path, capsys, model_dir, ranked, resolution=63), "resolution must be a multiple of 8", "63")


def test_batch_size_larger_than_the_data(model_dir, ranked, tmp_path, capsys):
    code, err = run(tmp_path, capsys, model_dir, ranked, batch_size=8)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("synpref train: batch_size 8 is larger than the data") and "3 usable prompt" in line


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only); None where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_full_disk_is_a_one_line_failure(model_dir, ranked, tmp_path, capsys, tiny_disk, monkeypatch):
    if tiny_disk is not None:  # a real full disk: the LoRA file does not fit in what is left
        with open(tiny_disk / "filler", "wb") as f:
            f.write(b"\0" * (1024 * 1024 - 24 * 1024))
        out = tiny_disk / "out"
    else:  # no mount rights: the OS's answer to a write on a full disk
        import safetensors.torch

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
        out = tmp_path / "out"
    code, err = run(tmp_path, capsys, model_dir, ranked, output_dir=str(out))
    failure(code, err, "save weights failed", "No space left on device")
