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

from synpref.jobs.eval_rewards import evaluate
from synpref.schemas.config import build_config_from_dict
from synpref.transforms.rewards import Reward, register_reward


def channel_reward(index):
    class ChannelMean(Reward):
        def score_batch(self, images, prompts):
            return [float(np.asarray(im)[..., index].mean()) for im in images]
    return ChannelMean


for i, name in enumerate(("eval_red", "eval_green", "eval_blue")):
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
