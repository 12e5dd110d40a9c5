"""Every diffusers family through ``synpref build``: the call each pipeline gets and the lineage it records.

One tiny random pipeline per family (demo/tiny_families.py), built offline from configs and loaded
through ``from_pretrained``. Each build's lineage is checked two ways, independently of synpref's
code: its values against the call the test expects, and by regenerating the staged images with
diffusers directly from the recorded arguments (same pixels, so nothing else went into the call).
"""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from synpref.cli import main
from synpref.demo.tiny_families import save_tiny_family, save_tiny_stable_cascade
from trainer_fixtures import one_thread  # noqa: F401 (fixture)

PROMPT = "a red cube on a table"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda family: _cached(root, family)


def _cached(root, family):
    path = root / family
    if not (path / "model_index.json").exists():
        save_tiny_family(family, path, seed=0)
    return str(path)


def write_job(tmp_path, generator: dict) -> str:
    """One prompt, one generator, two candidates (the fewest a ranking takes), a weight-free reward."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "prompts.txt").write_text(PROMPT + "\n")
    cfg = {
        "seed": 0, "candidates_per_generator": 2,
        "prompts": {"source": str(tmp_path / "prompts.txt")},
        "generators": [{"id": "g", **generator}],
        "rewards": [{"name": "sharpness"}],
        # Random tiny models make flat or similar images: keep every candidate.
        "filter": {"min_grey_sd": 0.0, "max_flat_share": None, "low_diversity_distance": None,
                   "near_duplicate_candidate_distance": None, "min_agreement_margin": 0.0},
        "output": {"output_dir": str(tmp_path / "out"), "staging": "keep"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def build_candidates(tmp_path, generator: dict) -> list[tuple[dict, np.ndarray]]:
    """Run ``synpref build``; (lineage, uint8 pixels) of each candidate in its ranked shard."""
    assert main(["build", "--config", write_job(tmp_path, generator)]) == 0
    out = []
    with tarfile.open(next((tmp_path / "out").glob("ranked/*.tar"))) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    meta = json.loads(next(v for k, v in members.items() if k.endswith(".json")))
    key = next(k for k in members if k.endswith(".json"))[: -len(".json")]
    for c in meta["candidates"]:
        pixels = np.asarray(Image.open(io.BytesIO(members[f"{key}.{c['image']}"])).convert("RGB"))
        out.append((c["lineage"], pixels))
    return sorted(out, key=lambda x: x[0]["seed"])


def regenerate(model_dir: str, lineages: list[dict]) -> np.ndarray:
    """The same call with diffusers alone, from the recorded arguments and seeds: uint8 images."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    args = dict(lineages[0]["call_args"])
    if "negative_prompt" in args:
        args["negative_prompt"] = [args["negative_prompt"]] * len(lineages)
    images = pipe(prompt=[PROMPT] * len(lineages), output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(l["seed"]) for l in lineages], **args).images
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def check(model_dir, tmp_path, generator: dict, pipeline_class: str, call_args: dict, generated=None):
    """Build, then: the lineage names the pipeline and records exactly ``call_args``; the images have the
    requested size; the model generated at ``generated`` (default: the requested size); and the recorded
    arguments regenerate the same pixels."""
    candidates = build_candidates(tmp_path, {"model": model_dir, **generator})
    lineages = [lin for lin, _ in candidates]
    h, w = generator["height"], generator["width"]
    for lin, pixels in candidates:
        assert lin["pipeline_class"] == pipeline_class
        assert lin["call_args"] == call_args
        assert (lin["height"], lin["width"]) == (h, w) and pixels.shape == (h, w, 3)
        assert (lin["generated_height"], lin["generated_width"]) == (generated or (h, w))
        assert lin["num_inference_steps"] == call_args["num_inference_steps"]
    again = regenerate(model_dir, lineages)
    for (_, pixels), image in zip(candidates, again):
        assert np.array_equal(pixels, image)
    return lineages


BASE = {"num_inference_steps": 2, "height": 64, "width": 64}


def test_sd1(models, tmp_path):
    check(models("sd"), tmp_path, {**BASE, "guidance_scale": 5.0, "negative_prompt": "blurry"},
          "StableDiffusionPipeline", {**BASE, "guidance_scale": 5.0, "negative_prompt": "blurry"})


def test_sdxl_takes_its_own_default_guidance(models, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    import inspect

    default = inspect.signature(StableDiffusionXLPipeline.__call__).parameters["guidance_scale"].default
    lineages = check(models("sdxl"), tmp_path, BASE, "StableDiffusionXLPipeline", {**BASE, "guidance_scale": default})
    assert lineages[0]["guidance_scale"] == default == 5.0


def test_sd3_with_call_args(models, tmp_path):
    import datasets

    gen = {**BASE, "guidance_scale": 4.0, "call_args": {"max_sequence_length": 32}}
    expected = {**BASE, "guidance_scale": 4.0, "max_sequence_length": 32}
    check(models("sd3"), tmp_path, gen, "StableDiffusion3Pipeline", expected)
    # The dataset card's features carry call_args as JSON: they read back as the same mapping.
    row = datasets.load_dataset(str(tmp_path / "out"), "ranked", split="train")[0]
    assert [c["lineage"]["call_args"] for c in row["json"]["candidates"]] == [expected, expected]


def test_flux(models, tmp_path):
    gen = {**BASE, "guidance_scale": 3.5, "call_args": {"max_sequence_length": 64}}
    check(models("flux"), tmp_path, gen, "FluxPipeline", {**BASE, "guidance_scale": 3.5, "max_sequence_length": 64})


def expected_bin(table: dict, height: int, width: int) -> tuple[int, int]:
    """The trained size nearest in aspect ratio, from the pipeline's own table (diffusers' rule)."""
    ratio = min(table, key=lambda r: abs(float(r) - height / width))
    return int(table[ratio][0]), int(table[ratio][1])


def test_pixart_sigma_records_the_binned_size(models, tmp_path):
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_256_BIN

    gen = {"num_inference_steps": 2, "height": 64, "width": 96, "guidance_scale": 4.5,
           "call_args": {"max_sequence_length": 120}}
    binned = expected_bin(ASPECT_RATIO_256_BIN, 64, 96)  # tiny transformer: sample_size 32 -> the 256-px table
    assert binned != (64, 96)
    check(models("pixart_sigma"), tmp_path, gen, "PixArtSigmaPipeline",
          {"num_inference_steps": 2, "height": 64, "width": 96, "guidance_scale": 4.5, "max_sequence_length": 120},
          generated=binned)


@pytest.mark.slow
def test_sana_records_the_binned_size_and_binning_off(models, tmp_path):
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN

    gen = {**BASE, "guidance_scale": 4.5}
    check(models("sana"), tmp_path / "on", gen, "SanaPipeline", {**BASE, "guidance_scale": 4.5},
          generated=expected_bin(ASPECT_RATIO_512_BIN, 64, 64))  # sample_size 16 -> the 512-px table
    off = {**gen, "call_args": {"use_resolution_binning": False}}
    check(models("sana"), tmp_path / "off", off, "SanaPipeline",
          {**BASE, "guidance_scale": 4.5, "use_resolution_binning": False})


def test_stable_cascade_passes_prior_and_decoder_settings(models, tmp_path):
    """Model-card values for what is left unset (prior 20 steps at 4.0, decoder guidance 0.0), the config's
    for what is set; 128 px is the smallest size the tiny pipeline returns as requested."""
    gen = {"num_inference_steps": 2, "height": 128, "width": 128, "prior_guidance_scale": 2.0}
    lineages = check(models("stable_cascade"), tmp_path, gen, "StableCascadeCombinedPipeline",
                     {"num_inference_steps": 2, "height": 128, "width": 128, "prior_num_inference_steps": 20,
                      "prior_guidance_scale": 2.0, "decoder_guidance_scale": 0.0})
    assert lineages[0]["guidance_scale"] == 0.0  # the top-level field holds the decoder's


def test_stable_cascade_folder_as_diffusers_saves_it_loads(tmp_path):
    """diffusers writes the VQ-GAN as ["diffusers", "PaellaVQModel"], which its from_pretrained cannot load;
    synpref's loader can."""
    import diffusers

    from synpref.schemas.config import GeneratorConfig
    from synpref.transforms.generators import create_generator

    folder = save_tiny_stable_cascade(tmp_path / "sc", fix_index=False)
    assert json.loads((tmp_path / "sc" / "model_index.json").read_text())["vqgan"] == ["diffusers", "PaellaVQModel"]
    with pytest.raises((AttributeError, ValueError), match="PaellaVQModel"):
        diffusers.DiffusionPipeline.from_pretrained(folder)
    gen = create_generator(GeneratorConfig(id="sc", model=folder, num_inference_steps=1, height=128, width=128,
                                           prior_num_inference_steps=1))
    gen.load()
    (image,) = gen.generate(["a cat"], [3])
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()
    assert json.loads((tmp_path / "sc" / "model_index.json").read_text())["vqgan"] == ["diffusers", "PaellaVQModel"]


@pytest.mark.parametrize("family, generator, message", [
    ("stable_cascade", {"guidance_scale": 4.0},
     r"generator g: StableCascadeCombinedPipeline takes no 'guidance_scale' \(set prior_guidance_scale and "
     r"decoder_guidance_scale\); its __call__ accepts: prompt, images, height, width, prior_num_inference_steps"),
    ("sdxl", {"prior_guidance_scale": 4.0}, r"StableDiffusionXLPipeline takes no 'prior_guidance_scale'"),
    ("sd", {"call_args": {"max_sequence_length": 77}},
     r"generator g: StableDiffusionPipeline takes no argument 'max_sequence_length' \(call_args\); "
     r"its __call__ accepts: prompt, height, width"),
    ("sd", {"call_args": {"num_inference_steps": 3}},
     r"call_args.num_inference_steps is set by generators\[\].num_inference_steps, not call_args"),
])
def test_unknown_arguments_stop_the_build_before_any_model_loads(models, tmp_path, capsys, monkeypatch,
                                                                  family, generator, message):
    import diffusers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    model_dir = models(family)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_loading)
    job = write_job(tmp_path, {"model": model_dir, "height": 128, "width": 128, **generator})
    assert main(["build", "--config", job]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
