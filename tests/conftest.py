"""Shared fixtures: tiny offline models, built once per test session."""
import atexit
import logging
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A fresh datasets cache per session: its cache key for a local folder can match a folder an earlier
# run wrote under the same relative names, and then it "verifies" today's files against old split sizes.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="synpref-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
atexit.register(shutil.rmtree, _DATASETS_CACHE, True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
for name in ("apache_beam", "diffusers", "transformers"):
    logging.getLogger(name).setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory):
    """Two tiny SD pipelines and a tiny open_clip model, saved like real checkpoints."""
    from synpref.demo.tiny_models import save_demo_models

    return save_demo_models(tmp_path_factory.mktemp("models"))


def tiny_build_config(models: dict, output_dir, **overrides) -> dict:
    """A small build config (as YAML would give it) over the demo models."""
    gen = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64)
    cfg = {
        "seed": 0,
        "candidates_per_generator": 2,
        "prompts": {"source": "builtin", "num_prompts": 6},
        "generators": [dict(id="tiny-sd-a", model=models["tiny-sd-a"], **gen),
                       dict(id="tiny-sd-b", model=models["tiny-sd-b"], scheduler="EulerDiscreteScheduler", **gen)],
        "rewards": [{"name": "clip_score", "params": {**models["clip"], "variant": "cosine"}},
                    {"name": "jpeg_compressibility"}, {"name": "sharpness"}],
        "output": {"output_dir": str(output_dir), "samples_per_shard": 4},
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def digests(out) -> dict:
    """sha256 of every shard and index file, keyed by its path under ``out``."""
    import glob
    import hashlib

    files = sorted(glob.glob(f"{out}/ranked/*") + glob.glob(f"{out}/pairs/*"))
    return {os.path.relpath(f, out): hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files}
