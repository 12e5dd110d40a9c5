"""What the trainer tests share: one torch thread, a tiny SD1.x pipeline, ranked shards of random images.

Import the fixtures into a test module (``from trainer_fixtures import model_dir, one_thread``) to use them.
"""
import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from synpref.demo.tiny_models import save_tiny_sd_pipeline


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box they made each step ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


def write_ranked_shard(path, samples, rng: np.random.Generator, size: int = 32) -> None:
    """A ranked tar as the build writes it (json + img{i}.png in rank order) of ``samples`` =
    [(prompt_id, prompt, phis)], each image ``size`` px of uniform noise drawn from ``rng`` in order."""
    with wds.TarWriter(str(path), mtime=0) as sink:
        for pid, prompt, phis in samples:
            cands = [{"candidate_id": f"{pid}-{i}", "image": f"img{i}.png", "rank": i + 1, "phi": p}
                     for i, p in enumerate(phis)]
            images = {}
            for i in range(len(phis)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                images[f"img{i}.png"] = buf.getvalue()
            meta = {"prompt_id": pid, "prompt": prompt, "candidates": cands}
            sink.write({"__key__": pid, "json": json.dumps(meta).encode(), **images})
