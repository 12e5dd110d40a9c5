"""``synpref evaluate`` end to end on tiny SD models: a base, the base + a LoRA, the base with another
model's unet; judges recomputed from the saved PNGs; pixels recomputed with plain diffusers calls."""
import hashlib
import json
import shutil
from importlib import resources

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from synpref.cli import main
from synpref.pipelines.evaluate import evaluate
from synpref.schemas.eval_config import eval_config_from_dict, load_eval_config
from trainer_fixtures import one_thread  # noqa: F401  (fixture)

SAMPLING = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64)
JUDGES = ["brisque", "sharpness"]


def save_peft_lora(unet_dir, out_dir, seed: int, **unet_overrides) -> str:
    """A LoRA on the unet at ``unet_dir`` (or on a unet of another shape), saved as ``synpref train`` saves it.

    ``init_lora_weights=False`` draws both matrices at random, so the adapter changes the output."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    config = dict(UNet2DConditionModel.load_config(unet_dir), **unet_overrides)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), safe_serialization=True)
    return str(out_dir)


@pytest.fixture(scope="module")
def lora(demo_models, tmp_path_factory):
    return save_peft_lora(f"{demo_models['tiny-sd-a']}/unet", tmp_path_factory.mktemp("lora"), seed=5)


def eval_dict(models, lora_dir, out, **overrides) -> dict:
    cfg = {
        "models": [{"name": "base", "model": models["tiny-sd-a"], **SAMPLING},
                   {"name": "tuned", "model": models["tiny-sd-a"], "lora": lora_dir},
                   {"name": "swapped", "model": models["tiny-sd-a"], "denoiser": f"{models['tiny-sd-b']}/unet"}],
        "prompts": {"source": "builtin", "num_prompts": 3},
        "seeds_per_prompt": 2,
        "seed": 7,
        "judges": [{"name": j} for j in JUDGES],
        "output_dir": str(out),
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def evaluated(demo_models, lora, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    cfg = eval_config_from_dict(eval_dict(demo_models, lora, out))
    result = evaluate(cfg)
    return cfg, out, result, pq.read_table(out / "samples.parquet").to_pylist()


def test_samples_have_one_row_per_image_in_a_fixed_order(evaluated):
    cfg, out, result, rows = evaluated
    builtin = [json.loads(line) for line in
               resources.files("synpref.jobs").joinpath("builtin_prompts.jsonl").read_text().splitlines()]
    category = {p["prompt"]: p["category"] for p in builtin}
    assert pq.read_schema(out / "samples.parquet").names == ["model", "prompt_id", "prompt", "category", "seed",
                                                             "image", *JUDGES]
    assert len(rows) == 3 * 2 * 3 and not result["run"]["problems"]
    assert [r["model"] for r in rows] == ["base"] * 6 + ["tuned"] * 6 + ["swapped"] * 6
    for r in rows:
        assert r["prompt_id"] == hashlib.sha256(r["prompt"].encode()).hexdigest()[:16]
        assert r["category"] == category[r["prompt"]] != ""
        assert Image.open(out / r["image"]).format == "PNG" and r["image"].startswith(f"images/{r['model']}/")
    keys = [(r["prompt_id"], r["seed"]) for r in rows[:6]]
    assert keys == sorted(keys)
    assert json.loads((out / "eval_config.json").read_text())["models"][1]["num_inference_steps"] == 2  # inherited


def test_the_report_is_written_from_the_samples(evaluated):
    cfg, out, result, rows = evaluated

    def no_nan(value):
        raise ValueError(f"not strict JSON: {value}")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=no_nan)
    assert summary == json.loads(json.dumps(result["summary"]))
    assert summary["models"] == ["base", "tuned", "swapped"] and summary["counts"]["rows"] == len(rows)
    assert (out / "report.html").read_text().startswith("<!") and "tuned vs base" in result["text"]
    assert summary["gamed_judges"] == []  # no train_summary.json beside these weights: nothing traced
    assert json.loads((out / "run_summary.json").read_text())["training_rewards_unknown"] == ["tuned", "swapped"]


def test_every_model_gets_the_same_seeds_for_a_prompt(evaluated):
    _, _, _, rows = evaluated
    seeds = {m: sorted((r["prompt_id"], r["seed"]) for r in rows if r["model"] == m)
             for m in ("base", "tuned", "swapped")}
    assert seeds["base"] == seeds["tuned"] == seeds["swapped"]
    per_prompt = {}
    for pid, seed in seeds["base"]:
        per_prompt.setdefault(pid, set()).add(seed)
    assert all(len(s) == 2 for s in per_prompt.values())  # two different seeds per prompt
    assert len({frozenset(s) for s in per_prompt.values()}) == 3  # and different seeds for different prompts


def test_judge_columns_equal_the_rewards_on_the_saved_pngs(evaluated):
    from synpref.transforms.rewards import create_reward

    _, out, _, rows = evaluated
    images = [Image.open(out / r["image"]).convert("RGB") for r in rows]
    for name in JUDGES:
        reward = create_reward(name, {})
        reward.load()
        expected = [reward.score_batch([im], [r["prompt"]])[0] for im, r in zip(images, rows)]
        np.testing.assert_allclose([r[name] for r in rows], expected, rtol=1e-9, atol=1e-12)


def _diffusers_images(model, prompt, seeds, lora=None, unet=None) -> list[np.ndarray]:
    """What a user's own diffusers call gives for these seeds (uint8, as the PNGs hold them)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    extra = {"unet": UNet2DConditionModel.from_pretrained(unet)} if unet else {}
    pipe = StableDiffusionPipeline.from_pretrained(model, **extra)
    if lora:
        pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=[prompt] * len(seeds), num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                  generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
    return [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images]


def test_pixels_are_what_diffusers_gives_for_each_model(evaluated, demo_models, lora):
    _, out, _, rows = evaluated
    first = rows[0]["prompt_id"]
    mine = {m: [r for r in rows if r["model"] == m and r["prompt_id"] == first] for m in ("base", "tuned", "swapped")}
    seeds, prompt = [r["seed"] for r in mine["base"]], mine["base"][0]["prompt"]
    png = {m: [np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in rs] for m, rs in mine.items()}
    a = demo_models["tiny-sd-a"]
    for m, expected in (("base", _diffusers_images(a, prompt, seeds)),
                        ("tuned", _diffusers_images(a, prompt, seeds, lora=lora)),
                        ("swapped", _diffusers_images(a, prompt, seeds, unet=f"{demo_models['tiny-sd-b']}/unet"))):
        for got, want in zip(png[m], expected):
            assert np.array_equal(got, want), m
    for b, t in zip(png["base"], png["tuned"]):
        assert np.abs(b.astype(int) - t.astype(int)).mean() > 1.0  # the LoRA changes the image


def test_rerun_reuses_staged_images_and_a_changed_lora_does_not(demo_models, lora, tmp_path):
    own_lora = shutil.copytree(lora, tmp_path / "lora")
    data = eval_dict(demo_models, str(own_lora), tmp_path / "out", prompts={"source": "builtin", "num_prompts": 2})
    data["models"] = data["models"][:2]  # base and tuned
    first = evaluate(eval_config_from_dict(data))
    assert first["run"]["counters"]["images_generated"] == 8
    before = (tmp_path / "out/samples.parquet").read_bytes()
    same = evaluate(eval_config_from_dict(data))  # finished, healthy, intact: nothing to do
    assert same["run"]["up_to_date"] and same["run"]["counters"] == {} and same["summary"] == first["summary"]
    png = tmp_path / "out" / pq.read_table(tmp_path / "out/samples.parquet").column("image")[0].as_py()
    original = png.read_bytes()
    png.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one bit of one image changed, same size
    again = evaluate(eval_config_from_dict(data))  # not up to date: runs, and reuses every staged image
    assert not again["run"].get("up_to_date")
    assert again["run"]["counters"].get("images_generated", 0) == 0 and again["run"]["counters"]["images_reused"] == 8
    assert (tmp_path / "out/samples.parquet").read_bytes() == before  # same config: same bytes
    assert png.read_bytes() == original

    weights = load_file(own_lora / "pytorch_lora_weights.safetensors")
    save_file({k: v * 2 if ".up." in k else v for k, v in weights.items()},
              str(own_lora / "pytorch_lora_weights.safetensors"), metadata={"format": "pt"})
    changed = evaluate(eval_config_from_dict(data))
    assert changed["run"]["counters"]["images_generated"] == 4 and changed["run"]["counters"]["images_reused"] == 4
    rows = pq.read_table(tmp_path / "out/samples.parquet").to_pylist()
    old = pq.read_table(pa_buffer(before)).to_pylist()
    assert [r["sharpness"] for r in rows[:4]] == [r["sharpness"] for r in old[:4]]  # base: the same images
    assert [r["sharpness"] for r in rows[4:]] != [r["sharpness"] for r in old[4:]]  # tuned: new ones


def pa_buffer(data: bytes):
    import pyarrow as pa

    return pa.BufferReader(data)


def _garbage(tmp_path) -> str:
    """A checkpoint file that is there but is not a checkpoint: the judge fails to load."""
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    return str(tmp_path / "broken.safetensors")


def _write_config(tmp_path, data) -> str:
    import yaml

    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda d, m, t: d["models"][1].update(lora=str(t / "nowhere")), "models.1 (tuned).lora:"),
    (lambda d, m, t: d["models"][1].update(lora=str(t / "other_lora")), "does not fit"),
    (lambda d, m, t: d["models"][2].update(denoiser=str(t / "no_unet")), "models.2 (swapped).denoiser:"),
    (lambda d, m, t: d["judges"].append({"name": "no_such_judge"}), "judges.2.name: unknown reward 'no_such_judge'"),
    (lambda d, m, t: d["judges"].append({"name": "clip_score", "params": {**m["clip"], "checkpoint": _garbage(t)}}),
     "judges.2 (clip_score): does not load"),
    (lambda d, m, t: d["models"][2].update(name="base"), "model names must be unique; repeated: base"),
    (lambda d, m, t: d["models"][0].update(scheduler="NoSuchScheduler"), "models.0 (base).scheduler:"),
])
def test_bad_input_is_one_line_exit_2_before_any_image(demo_models, lora, tmp_path, capsys, change, message):
    save_peft_lora(f"{demo_models['tiny-sd-a']}/unet", tmp_path / "other_lora", seed=1, cross_attention_dim=16)
    data = eval_dict(demo_models, lora, tmp_path / "out")
    change(data, demo_models, tmp_path)
    assert main(["evaluate", "--config", _write_config(tmp_path, data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("synpref evaluate: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out/images").exists() and not (tmp_path / "out/eval_config.json").exists()


def test_set_overrides_use_key_paths_and_bad_ones_name_the_key(demo_models, lora, tmp_path, capsys):
    path = _write_config(tmp_path, eval_dict(demo_models, lora, tmp_path / "out"))
    cfg = load_eval_config(path, ["models.1.guidance_scale=3.5", "seeds_per_prompt=4"])
    assert cfg.generator_configs()[1].guidance_scale == 3.5 and cfg.generator_configs()[2].guidance_scale == 5.0
    assert cfg.seeds_per_prompt == 4
    assert main(["evaluate", "--config", path, "--set", "models.1.height=65"]) == 2
    assert capsys.readouterr().err.strip() == ("synpref evaluate: config.models.1.height must be a multiple of 8 "
                                               "(the VAE downsamples by 8), got 65")
    assert main(["evaluate", "--config", path, "--set", "models.0.steps=3"]) == 2
    assert capsys.readouterr().err.strip().startswith("synpref evaluate: config.models.0: unknown key(s) ['steps']")


def test_a_generator_lora_is_in_the_staging_key_by_content_not_path(demo_models, lora, tmp_path):
    from synpref.schemas.config import GeneratorConfig
    from synpref.transforms.staging import generator_fingerprint

    plain = GeneratorConfig(id="g", model=demo_models["tiny-sd-a"])
    with_lora = GeneratorConfig(id="g", model=demo_models["tiny-sd-a"], lora=lora)
    moved = GeneratorConfig(id="g", model=demo_models["tiny-sd-a"], lora=str(shutil.copytree(lora, tmp_path / "moved")))
    assert generator_fingerprint(with_lora) != generator_fingerprint(plain)
    assert generator_fingerprint(moved) == generator_fingerprint(with_lora)  # same weights elsewhere: same images
    path = tmp_path / "moved" / "pytorch_lora_weights.safetensors"
    weights = load_file(path)
    save_file({k: v + 1e-3 if ".down." in k else v for k, v in weights.items()}, str(path), metadata={"format": "pt"})
    assert generator_fingerprint(moved) != generator_fingerprint(with_lora)


def test_a_build_with_a_lora_that_does_not_fit_stops_in_preflight(demo_models, tmp_path):
    from conftest import tiny_build_config
    from synpref.pipelines.preflight import preflight
    from synpref.schemas.config import build_config_from_dict

    other = save_peft_lora(f"{demo_models['tiny-sd-a']}/unet", tmp_path / "other", seed=1, cross_attention_dim=16)
    cfg = tiny_build_config(demo_models, tmp_path / "out")
    cfg["generators"][0]["lora"] = other
    with pytest.raises(ValueError, match="generator tiny-sd-a: lora .* does not fit"):
        preflight(build_config_from_dict(cfg))


def test_a_model_that_fails_on_the_workers_is_exit_1_naming_the_step(demo_models, lora, tmp_path, capsys):
    broken = shutil.copytree(demo_models["tiny-sd-a"], tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")  # config fine, weights not
    data = eval_dict(demo_models, lora, tmp_path / "out", prompts={"source": "builtin", "num_prompts": 1})
    data["models"] = [data["models"][0], {"name": "broken", "model": str(broken)}]
    assert main(["evaluate", "--config", _write_config(tmp_path, data)]) == 1
    first, hint = capsys.readouterr().err.strip().splitlines()
    assert first.startswith("synpref evaluate: Generate[broken] failed: ") and hint.startswith("(-v shows")


def test_a_denoiser_is_keyed_by_its_own_folder_not_what_lies_beside_it(demo_models, tmp_path):
    from synpref.schemas.config import GeneratorConfig
    from synpref.transforms.staging import generator_fingerprint

    train_out = tmp_path / "train"
    shutil.copytree(f"{demo_models['tiny-sd-b']}/unet", train_out / "unet")
    (train_out / "train_log.csv").write_text("step,loss\n1,0.5\n")

    def key(denoiser):
        return generator_fingerprint(GeneratorConfig(id="g", model=demo_models["tiny-sd-a"], denoiser=str(denoiser)))

    assert key(train_out) == key(train_out / "unet") == key(f"{demo_models['tiny-sd-b']}/unet")
    (train_out / "train_log.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
    assert key(train_out) == key(train_out / "unet")
    (train_out / "unet" / "config.json").write_text((train_out / "unet" / "config.json").read_text() + " ")
    assert key(train_out) != key(f"{demo_models['tiny-sd-b']}/unet")
