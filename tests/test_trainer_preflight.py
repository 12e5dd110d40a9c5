"""preflight_train: every bad training config fails before the first step, with one line naming the culprit."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from synpref.training.config import TrainConfig
from synpref.training.preflight import preflight_train


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def tar(path, samples) -> str:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


@pytest.fixture
def setup(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    shards = tmp_path / "ranked"
    shards.mkdir()
    tar(shards / "ranked-00000.tar", [{"__key__": "p1", "json": json.dumps({"prompt": "x", "candidates": []}).encode(),
                                       "img0.png": b"x", "img1.png": b"y"}])
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    tar(pairs / "pairs-00000.tar", [{"__key__": "a__b", "json": b"{}", "win.png": b"x", "lose.png": b"y"}])

    def make(**kw):
        values = {"pretrained_model": str(model), "shards": [str(shards)], "output_dir": str(tmp_path / "out"), **kw}
        return TrainConfig.from_dict(values)

    return tmp_path, make


def test_good_config_passes_and_probes_output_dir(setup):
    tmp_path, make = setup
    urls = preflight_train(make())
    assert urls == [str(tmp_path / "ranked" / "ranked-00000.tar")]
    assert (tmp_path / "out").is_dir() and list((tmp_path / "out").iterdir()) == []  # probe removed
    assert preflight_train(make(shards=[str(tmp_path / "pairs")], data_format="pairs"))


def test_shard_entry_matching_nothing_is_named(setup):
    tmp_path, make = setup
    missing = str(tmp_path / "nope-*.tar")
    with pytest.raises(FileNotFoundError) as e:
        preflight_train(make(shards=[str(tmp_path / "ranked"), missing]))
    assert missing in one_line(e) and "no shards found" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        preflight_train(make(shards=[str(empty)]))
    assert str(empty) in one_line(e)


def test_empty_shard_list(setup):
    _, make = setup
    with pytest.raises(ValueError) as e:  # TrainConfig refuses it already
        make(shards=[])
    assert "shards is empty" in one_line(e)
    cfg = make()
    object.__setattr__(cfg, "shards", [])  # a config that got past construction somehow
    with pytest.raises(ValueError) as e:
        preflight_train(cfg)
    assert "shards is empty" in one_line(e)


def test_output_dir_that_cannot_be_created(setup):
    tmp_path, make = setup
    (tmp_path / "a_file").write_text("not a folder")
    bad = str(tmp_path / "a_file" / "out")
    with pytest.raises(ValueError) as e:
        preflight_train(make(output_dir=bad))
    msg = one_line(e)
    assert bad in msg and "output_dir" in msg and "cannot be created or written" in msg


def test_missing_local_model_folder(setup, monkeypatch):
    tmp_path, make = setup
    gone = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError) as e:
        preflight_train(make(pretrained_model=gone))
    msg = one_line(e)
    assert f"model folder {gone!r} does not exist" in msg and "Repo id" not in msg
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError) as e:
        preflight_train(make(pretrained_model=str(tmp_path / "model.bin")))
    assert "is a file" in one_line(e)
    # a hub-id-shaped name that is neither a folder nor cached, offline
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        preflight_train(make(pretrained_model="someone/missing-model"))
    assert "model folder 'someone/missing-model' does not exist" in one_line(e)
    assert not (tmp_path / "out").exists()  # nothing created before the config checks pass


def test_max_steps_below_one(setup):
    _, make = setup
    with pytest.raises(ValueError) as e:
        make(max_steps=0)
    assert "max_steps" in one_line(e)
    cfg = make()
    object.__setattr__(cfg, "max_steps", 0)
    with pytest.raises(ValueError) as e:
        preflight_train(cfg)
    assert "max_steps must be an integer >= 1, got 0" == one_line(e)


def test_unknown_data_format(setup):
    _, make = setup
    with pytest.raises(ValueError) as e:
        make(data_format="tfrecord")
    assert "data_format: 'tfrecord' is not one of ['auto', 'ranked', 'pairs', 'pickapic']" in one_line(e)
    cfg = make()
    object.__setattr__(cfg, "data_format", "tfrecord")
    with pytest.raises(ValueError) as e:
        preflight_train(cfg)
    assert "unknown data_format 'tfrecord'" in one_line(e)


def test_pickapic_parquet_missing_columns(setup):
    tmp_path, make = setup
    folder = tmp_path / "pickapic"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["c"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": [1.0]}), folder / "a.parquet")
    assert preflight_train(make(shards=[str(folder)], data_format="pickapic")) == [str(folder / "a.parquet")]
    pq.write_table(pa.table({"caption": ["c"], "image": [b"x"]}), folder / "b.parquet")
    with pytest.raises(ValueError) as e:
        preflight_train(make(shards=[str(folder)], data_format="pickapic"))
    msg = one_line(e)
    assert str(folder / "b.parquet") in msg and "['jpg_0', 'jpg_1', 'label_0']" in msg
    (folder / "c.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError) as e:
        preflight_train(make(shards=[str(folder / "c.parquet")], data_format="pickapic"))
    assert "c.parquet is not a readable parquet file" in one_line(e)


def test_ranked_pairs_mix_up(setup):
    tmp_path, make = setup
    with pytest.raises(ValueError) as e:
        preflight_train(make(shards=[str(tmp_path / "pairs")], data_format="ranked"))
    assert "holds pairs samples" in one_line(e) and "data_format: pairs" in str(e.value)
    with pytest.raises(ValueError) as e:
        preflight_train(make(data_format="pairs"))
    assert "holds ranked samples" in one_line(e)


def test_from_dict_rejects_unknown_keys_in_one_line(setup):
    _, make = setup
    with pytest.raises(ValueError) as e:
        make(min_pair_agreemnt=0.5)
    msg = one_line(e)
    assert "unknown key(s) ['min_pair_agreemnt']" in msg and "min_pair_agreement" in msg  # lists the valid keys
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"shards": ["s"]})
    assert "missing required config keys ['output_dir', 'pretrained_model']" in one_line(e)
    with pytest.raises(ValueError) as e:
        make(min_pair_agreement="high")
    assert "min_pair_agreement: must be float, got 'high'" in one_line(e)
    assert make().model_copy(update={"min_pair_agreement": 0.2}).min_pair_agreement == 0.2
