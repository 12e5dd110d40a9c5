"""Generators: seeds, lineage and the real from_pretrained loading path (local dir and fsspec URL)."""
import os

import fsspec
import numpy as np
import pytest

from synpref.schemas.config import GeneratorConfig
from synpref.schemas.records import PromptRecord
from synpref.transforms.generation import derive_seed, make_request
from synpref.transforms.generators import available_generators, create_generator
from synpref.transforms.model_io import local_copy


def config(model, **kw):
    return GeneratorConfig(id="tiny", model=model, num_inference_steps=2, height=64, width=64, **kw)


def test_seeds_depend_on_job_seed_prompt_generator_and_index():
    base = derive_seed(0, "p", "g", 0)
    assert base == derive_seed(0, "p", "g", 0)
    assert len({base, derive_seed(1, "p", "g", 0), derive_seed(0, "q", "g", 0), derive_seed(0, "p", "h", 0),
                derive_seed(0, "p", "g", 1)}) == 5
    req = make_request(PromptRecord("p", "a cube"), "g", 3, 0)
    assert req.seeds == tuple(derive_seed(0, "p", "g", i) for i in range(3))
    assert req.candidate_id(2) == "p-g-2"


def test_same_seed_same_pixels_and_lineage(demo_models):
    gen = create_generator(config(demo_models["tiny-sd-a"], scheduler="DDIMScheduler"))
    gen.load()
    a, b = gen.generate(["a red cube", "a red cube"], [7, 8])
    # Same batch, same bits. (Batch size changes CPU kernels' last bits, which is why the pipeline
    # always sends one prompt's K seeds for one generator as one call.)
    again, _ = gen.generate(["a red cube", "a red cube"], [7, 8])
    assert a.shape == (64, 64, 3) and np.array_equal(a, again) and not np.array_equal(a, b)
    lineage = gen.lineage(7)
    assert (lineage.scheduler, lineage.pipeline_class, lineage.seed) == ("DDIMScheduler", "StableDiffusionPipeline", 7)


def test_models_load_from_fsspec_urls_through_a_local_cache(demo_models, tmp_path):
    fs = fsspec.filesystem("memory")
    root = demo_models["tiny-sd-a"]
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            fs.pipe(f"/models/tiny-sd-a/{rel}", open(os.path.join(dirpath, name), "rb").read())
    url = "memory:///models/tiny-sd-a"
    cached = local_copy(url, str(tmp_path))
    assert sorted(os.listdir(cached)) == sorted(os.listdir(root))
    assert local_copy(url, str(tmp_path)) == cached  # downloaded once
    remote = create_generator(config(url, cache_dir=str(tmp_path)))
    remote.load()
    local = create_generator(config(root))
    local.load()
    assert np.array_equal(remote.generate(["x"], [1])[0], local.generate(["x"], [1])[0])


def test_missing_models_and_unknown_types_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="memory:///nope"):
        local_copy("memory:///nope", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown generator type 'comfy'; available: \['diffusers', 'procedural'"):
        create_generator(GeneratorConfig(id="x", model="m", type="comfy"))
    assert "diffusers" in available_generators()  # tests may register more (test_candidate_filters does)


def test_a_missing_model_fails_before_the_pipeline_starts(demo_models, tmp_path):
    from conftest import tiny_build_config
    from synpref.pipelines.build_preferences import build
    from synpref.runs.errors import RunRefused
    from synpref.schemas.config import build_config_from_dict

    cfg = tiny_build_config(demo_models, tmp_path / "out")
    cfg["generators"][1]["model"] = str(tmp_path / "models" / "sd-typo")
    # preflight runs inside build(): a mistake it finds is a RunRefused (the CLI's one line, exit 2)
    with pytest.raises(RunRefused, match=r"generator tiny-sd-b: model: .*sd-typo does not exist"):
        build(build_config_from_dict(cfg))
    cfg = tiny_build_config(demo_models, tmp_path / "out")
    cfg["rewards"][0]["params"]["checkpoint"] = "memory:///no/such.safetensors"
    with pytest.raises(RunRefused, match="reward clip_score: checkpoint: memory:///no/such.safetensors"):
        build(build_config_from_dict(cfg))
    assert not (tmp_path / "out").exists()


def test_batched_requests_keep_each_image_with_its_prompt_and_seed(demo_models, tmp_path):
    """batch_size 3: three prompts' seeds in one diffusers call, each image staged under its own request."""
    from synpref.transforms.generation import generator_handler
    from synpref.transforms.staging import generator_fingerprint
    from synpref.transforms.imageio import decode_image

    cfg = config(demo_models["tiny-sd-a"], batch_size=3)
    fp = generator_fingerprint(cfg)
    assert fp != generator_fingerprint(config(demo_models["tiny-sd-a"]))  # batched images never pass as unbatched
    reqs = [make_request(PromptRecord(f"p{i}", text), "tiny", 2, 0, fp)
            for i, text in enumerate(["a red cube", "a blue ball", "a green tree"])]
    handler = generator_handler(cfg, str(tmp_path))
    assert handler.batch_elements_kwargs() == {"min_batch_size": 3, "max_batch_size": 3}
    model = handler.load_model()
    results = handler.run_inference(reqs, model)
    single = create_generator(config(demo_models["tiny-sd-a"]))
    single.load()
    for req, result in zip(reqs, results):
        assert result.example is req
        for i, cand in enumerate(result.inference):
            assert cand.candidate_id == req.candidate_id(i) and cand.lineage.seed == req.seeds[i]
            assert cand.image_uri.endswith(f"/{req.image_keys[i]}.png")
            # the image is this prompt's: close to a one-prompt call with the same seed (only last bits differ)
            alone = single.generate([req.prompt.prompt], [req.seeds[i]])[0]
            staged = np.asarray(decode_image(open(cand.image_uri, "rb").read()), dtype=np.float32) / 255
            assert np.abs(staged - alone).max() < 0.02
