"""The model-free ``procedural`` generator: deterministic images, and a tiny build through it end to end."""
import json

import numpy as np
import pytest

from synpref.schemas.config import GeneratorConfig, build_config_from_dict
from synpref.transforms.generators import available_generators, create_generator


def make(height=64, width=64, **kw):
    gen = create_generator(GeneratorConfig(id="proc", model="synpref/procedural", type="procedural",
                                           height=height, width=width, **kw))
    gen.load()
    return gen


def test_registered():
    assert "procedural" in available_generators()


def test_same_seed_same_image_different_seed_different_image():
    gen = make()
    a = gen.generate(["a red cube", "a red cube", "a red cube"], [1, 1, 2])
    again = make().generate(["a red cube"], [1])[0]
    assert np.array_equal(a[0], a[1]) and np.array_equal(a[0], again)
    assert not np.array_equal(a[0], a[2])
    other_prompt = gen.generate(["a blue sphere"], [1])[0]
    assert not np.array_equal(a[0], other_prompt)


@pytest.mark.parametrize("height,width", [(64, 64), (48, 80), (512, 512)])
def test_shape_dtype_range(height, width):
    images = make(height, width).generate(["p0", "p1"], [3, 4])
    assert len(images) == 2
    for im in images:
        assert im.shape == (height, width, 3) and im.dtype == np.float32
        assert np.isfinite(im).all() and im.min() >= 0.0 and im.max() <= 1.0
        assert im.std() > 0.01  # not a flat image


def test_lineage():
    lin = make().lineage(7)
    assert (lin.generator_id, lin.model, lin.pipeline_class, lin.scheduler, lin.dtype, lin.seed) == (
        "proc", "synpref/procedural", "procedural", "none", "float32", 7)
    assert (lin.height, lin.width) == (64, 64)


def test_sharpness_spreads_across_seeds():
    from PIL import Image

    from synpref.transforms.rewards.sharpness import laplacian_variance

    scores = [laplacian_variance(Image.fromarray((im * 255.0).round().astype(np.uint8)))
              for im in make(128, 128).generate(["p"] * 8, list(range(8)))]
    assert len(set(scores)) == 8 and max(scores) > 2 * min(scores)


def test_tiny_build_end_to_end(tmp_path):
    from synpref.pipelines.build_preferences import build

    cfg = build_config_from_dict({
        "seed": 0,
        "candidates_per_generator": 2,
        "prompts": {"source": "builtin", "num_prompts": 6},
        "generators": [{"id": "proc", "type": "procedural", "model": "synpref/procedural", "height": 64, "width": 64}],
        "rewards": [{"name": "sharpness"}],
        "output": {"output_dir": str(tmp_path / "out"), "samples_per_shard": 4},
    })
    result = build(cfg)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    counts = manifest["counts"]
    for level in ("prompts", "candidates", "pairs"):
        assert counts[level]["balanced"], (level, counts[level])
    assert counts["prompts"]["written"] == 6
    assert counts["candidates"]["written"] == 12
    assert len(manifest["shards"]) == 2
    assert result["summary"]["counts"] == counts
