"""Same config, same bytes: two `synpref train` processes write byte-identical LoRA files.

Each run is its own process with its own PYTHONHASHSEED: set iteration order (the LoRA's
``target_modules`` in the file's metadata) changes with it, as it does between any two runs of Python.
"""
import hashlib
import os
import subprocess
import sys

import numpy as np
import yaml

from trainer_fixtures import model_dir, one_thread, write_ranked_shard  # noqa: F401 (fixtures)


def test_two_identical_train_runs_write_identical_lora_bytes(model_dir, tmp_path):
    write_ranked_shard(tmp_path / "ranked-00000.tar", [("a1", "a red cube", [1.0, 0.5, 0.0]), ("a2", "two cats", [0.7, 0.2])],
                       np.random.default_rng(0))
    digests = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"run-{hash_seed}"
        cfg = {"pretrained_model": str(model_dir), "shards": [str(tmp_path / "ranked-00000.tar")],
               "output_dir": str(out), "resolution": 32, "batch_size": 2, "max_steps": 2, "learning_rate": 1e-3,
               "torch_threads": 1}
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "HF_HUB_OFFLINE": "1"}
        run = subprocess.run([sys.executable, "-m", "synpref.cli", "train", "--config", str(tmp_path / "train.yaml")],
                             env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        digests.append(hashlib.sha256((out / "pytorch_lora_weights.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
