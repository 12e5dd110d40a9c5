"""synpref eval-rewards: accuracies on a small Pick-a-Pic-schema parquet equal a hand count."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from synpref.reporting.reward_accuracy import evaluate
from synpref.schemas.config import build_config_from_dict
from synpref.transforms.rewards import Reward, register_reward


def channel_reward(index):
    class ChannelMean(Reward):
        def score_batch(self, images, prompts):
            return [float(np.asarray(im)[..., index].mean()) for im in images]
    return ChannelMean


for i, name in ((0, "eval_red"), (1, "eval_green"), (2, "eval_blue"), (0, "eval_red_copy")):
    register_reward(name)(channel_reward(i))


def png(rgb):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


ROWS = [  # (img0 colour, img1 colour, label_0)
    ((200, 0, 0), (100, 50, 0), 1.0),   # red right, green wrong, Syn-Pic phi tie
    ((10, 10, 0), (10, 90, 0), 0.0),    # red tie, green right, Syn-Pic right
    ((1, 1, 1), (2, 2, 2), 0.5),        # a human tie: skipped
    (None, (2, 2, 2), 1.0),             # an image that does not decode: skipped
    ((50, 50, 0), (60, 40, 0), 1.0),    # red wrong, green right, Syn-Pic phi tie
]


@pytest.fixture
def pairs(tmp_path):
    table = pa.table({
        "caption": [f"pair {i}" for i in range(len(ROWS))],
        "jpg_0": [png(a) if a else b"<html>not an image</html>" for a, _, _ in ROWS],
        "jpg_1": [png(b) for _, b, _ in ROWS],
        "label_0": [label for _, _, label in ROWS],
    })
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    return path


def config(tmp_path):
    return {"prompts": {"source": "builtin"}, "generators": [{"id": "g", "model": "synpref/procedural",
                                                              "type": "procedural"}],
            "rewards": [{"name": "eval_red"}, {"name": "eval_green"}, {"name": "eval_blue"}],
            "output": {"output_dir": str(tmp_path / "unused")}}


def test_accuracies_equal_a_hand_count(pairs, tmp_path):
    report = evaluate(build_config_from_dict(config(tmp_path)), str(pairs), batch_rows=2)
    acc = {r["name"]: (r["accuracy"], r["pairs"]) for r in report["results"]}
    # hand count over the 3 usable pairs (right 1, score tie 0.5, wrong 0):
    assert acc["eval_red"] == (pytest.approx((1 + 0.5 + 0) / 3), 3)
    assert acc["eval_green"] == (pytest.approx((0 + 1 + 1) / 3), 3)
    assert acc["eval_blue"] == (pytest.approx(0.5), 3)
    # Syn-Pic over the three: phi ties on pairs 1 and 3 (one reward each way), right on pair 2
    assert acc["aggregate"] == (pytest.approx((0.5 + 1 + 0.5) / 3), 3)
    assert report["skipped"] == {"tie": 1, "bad_label": 0, "bad_image": 1}


def test_cli_prints_the_table_writes_json_and_rejects_a_wrong_schema(pairs, tmp_path):
    # the CLI process cannot see this module's test rewards: evaluate built-in weight-free ones
    cfg = config(tmp_path)
    cfg["rewards"] = [{"name": "colourfulness"}, {"name": "sharpness"}]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "synpref.cli", "eval-rewards", "--config", "job.yaml"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(cmd + ["--pairs", str(pairs), "--json", "out.json"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "syn_pic (all rewards)" in ok.stdout and "skipped: tie=1, bad_label=0, bad_image=1" in ok.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert [r["name"] for r in report["results"]] == ["colourfulness", "sharpness", "aggregate"]
    pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "wrong.parquet")
    bad = subprocess.run(cmd + ["--pairs", "wrong.parquet"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "missing column(s) ['caption', 'jpg_0', 'jpg_1', 'label_0']" in bad.stderr


def _sd(values):
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


@pytest.mark.parametrize("aggregator,scope", [("mean_bt", "dataset"), ("mean_zscore", "dataset")])
def test_aggregators_with_dataset_moments_label_after_a_first_pass(pairs, tmp_path, aggregator, scope):
    cfg = config(tmp_path)
    cfg["ranking"] = {"aggregator": aggregator, "zscore_scope": scope}
    report = evaluate(build_config_from_dict(cfg), str(pairs), batch_rows=2)
    # statistics over the 6 images of the 3 usable pairs (population sd; the constant blue reward: 0)
    usable = [r for r in ROWS if r[0] is not None and r[2] != 0.5]
    red = [c[0] for a, b, _ in usable for c in (a, b)]
    green = [c[1] for a, b, _ in usable for c in (a, b)]
    moments = report["dataset_stats"]["moments"]
    assert moments["sd"]["eval_red"] == pytest.approx(_sd(red))  # 65.17
    assert moments["sd"]["eval_green"] == pytest.approx(_sd(green))  # 29.44
    assert moments["sd"]["eval_blue"] == 0.0 and moments["count"]["eval_red"] == 6
    # Hand count with s_red = 65.17, s_green = 29.44 (blue counts 0.5 / 0 either way):
    # pair 1 (label 1): red +100/65.17 = +1.53, green -50/29.44 = -1.70 -> image 1 ahead: wrong;
    # pair 2 (label 0): green -80/29.44 -> image 1 ahead: right;
    # pair 3 (label 1): red -10/65.17 = -0.15, green +10/29.44 = +0.34 -> image 0 ahead: right.
    # (mean_bt: sigmoid(1.53) + sigmoid(-1.70) = 0.822 + 0.154 < 1; same verdicts.) Syn-Pic tied pairs 1, 3.
    acc = {r["name"]: (r["accuracy"], r["pairs"]) for r in report["results"]}
    assert acc["aggregate"] == (pytest.approx(2 / 3), 3)
    assert acc["eval_green"] == (pytest.approx(2 / 3), 3)  # the per-reward columns are unchanged


RELIABILITY_ROWS = [  # (img0, img1, label_0) for rewards red, green, blue, red_copy
    ((100, 100, 0), (50, 50, 100), 1.0),  # red, red_copy, green prefer 0; blue prefers 1
    ((90, 10, 50), (10, 90, 40), 0.0),    # red, red_copy, blue prefer 0; green prefers 1
    ((10, 50, 90), (20, 40, 10), 1.0),    # red, red_copy prefer 1; green, blue prefer 0: a Syn-Pic tie
]


def test_reliability_weighted_estimates_weights_from_the_pairs_first(tmp_path):
    path = tmp_path / "rel.parquet"
    pq.write_table(pa.table({"caption": ["x"] * 3, "jpg_0": [png(a) for a, _, _ in RELIABILITY_ROWS],
                             "jpg_1": [png(b) for _, b, _ in RELIABILITY_ROWS],
                             "label_0": [l for _, _, l in RELIABILITY_ROWS]}), path)
    cfg = config(tmp_path)
    cfg["rewards"].append({"name": "eval_red_copy"})
    results = {}
    for aggregator in ("syn_pic", "reliability_weighted"):
        cfg["ranking"] = {"aggregator": aggregator}
        results[aggregator] = evaluate(build_config_from_dict(cfg), str(path), batch_rows=2)
    # Hand count of the leave-one-out rule, each pair a group of two:
    #   red:   pair 1 others 2:1 for image 0, red agrees; pair 2 others 2:1 for 0, agrees; pair 3 others
    #          2:1 for image 0, red prefers 1: disagrees -> 2/3 -> weight 2*2/3 - 1 = 1/3 (red_copy alike);
    #   green: pair 1 agrees, pair 2 disagrees, pair 3 (others 2:1 for image 1) disagrees -> 1/3 -> 0;
    #   blue:  pair 1 disagrees, pair 2 agrees, pair 3 disagrees -> 1/3 -> 0.
    rel = results["reliability_weighted"]["dataset_stats"]["reliability"]
    assert rel["agree"] == pytest.approx({"eval_red": 2 / 3, "eval_green": 1 / 3, "eval_blue": 1 / 3,
                                          "eval_red_copy": 2 / 3})
    assert rel["weight"] == pytest.approx({"eval_red": 1 / 3, "eval_green": 0.0, "eval_blue": 0.0,
                                           "eval_red_copy": 1 / 3})
    assert rel["pairs"] == {"eval_red": 3, "eval_green": 3, "eval_blue": 3, "eval_red_copy": 3}
    # weighted: only red (twice) votes -> right, wrong, wrong; Syn-Pic: right, wrong, tie
    acc = {a: next(r for r in rep["results"] if r["name"] == "aggregate")["accuracy"] for a, rep in results.items()}
    assert acc == {"syn_pic": pytest.approx(0.5), "reliability_weighted": pytest.approx(1 / 3)}
    from synpref.reporting.reward_accuracy import format_table

    assert "estimated reward weights: eval_red=0.333, eval_green=0.000, eval_blue=0.000, eval_red_copy=0.333" \
        in format_table(results["reliability_weighted"])


def test_pairs_in_the_published_folder_layout_or_a_glob_read_as_one_set(pairs, tmp_path):
    """Pick-a-Pic v2 is published as data/train-NNNNN-of-MMMMM.parquet: a folder or a glob is the whole set."""
    table = pq.read_table(pairs)
    (tmp_path / "pap" / "data").mkdir(parents=True)
    pq.write_table(table.slice(0, 2), tmp_path / "pap/data/train-00000-of-00002.parquet")
    pq.write_table(table.slice(2), tmp_path / "pap/data/train-00001-of-00002.parquet")
    cfg = build_config_from_dict(config(tmp_path))
    whole = {k: v for k, v in evaluate(cfg, str(pairs)).items() if k != "pairs_file"}
    for location in (tmp_path / "pap", tmp_path / "pap/data", tmp_path / "pap/data/train-*.parquet"):
        report = evaluate(cfg, str(location))
        assert report.pop("pairs_file") == str(location) and report == whole, location
    with pytest.raises(FileNotFoundError, match="no Parquet files at"):
        evaluate(cfg, str(tmp_path / "empty_dir_*"))
