"""Config mistakes through the real ``synpref`` command: exit 2, one line naming the key, no traceback,
before any work (build, filter, train share one loader, one ``--set`` grammar and one error format)."""
import json
import logging
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from synpref.demo.run import demo_config


@pytest.fixture
def synpref(capsys, monkeypatch, tmp_path):
    """Run ``synpref <command> --config <job> [--set ...]`` in-process; return its one stderr line.
    The jobs themselves are replaced by a function that fails the test: nothing may start."""
    import synpref.runs.pipeline_run as pipeline_run
    import synpref.training.train as tt
    from synpref.cli import main

    def started(*args, **kwargs):
        raise AssertionError("the job started: the mistake was not caught before any work")

    # build and filter run their preflight inside the job, before taking the folder's lock (the first work)
    monkeypatch.setattr(pipeline_run, "locked_output", started)
    monkeypatch.setattr(tt, "train", started)
    root_level = logging.getLogger().level

    def run(command: str, job: dict, *sets: str) -> str:
        path = tmp_path / f"{command}.yaml"
        path.write_text(yaml.safe_dump(job))
        capsys.readouterr()
        with warnings.catch_warnings():  # main() sets process-wide logging/warning filters
            code = main([command, "--config", str(path), *[a for s in sets for a in ("--set", s)]])
        logging.getLogger().setLevel(root_level)
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"synpref {command}: "), err
        assert "Traceback" not in err
        return lines[0]

    return run


@pytest.fixture
def jobs(tmp_path):
    (tmp_path / "corpus").mkdir()
    filter_job = demo_config("demo_filter.yaml", str(tmp_path))
    filter_job["input"]["source"] = [str(tmp_path / "corpus")]
    filter_job["output"]["output_dir"] = str(tmp_path / "filter")
    return {"build": demo_config("demo_build.yaml", str(tmp_path)), "filter": filter_job,
            "train": demo_config("demo_train.yaml", str(tmp_path))}


def test_non_finite_numbers_are_refused_up_front(synpref, jobs):
    build = jobs["build"]
    build["generators"][0]["guidance_scale"] = "nan"  # YAML's bare nan is the string 'nan'
    assert "config.generators.0.guidance_scale must be a finite number, got 'nan'" in synpref("build", build)
    assert "config.generators.1.guidance_scale must be a finite number, got inf" in synpref(
        "build", jobs["build"], "generators.1.guidance_scale=.inf")  # YAML's .inf is a float
    assert "config.rewards.2.params.x must be a finite number, got nan" in synpref(
        "build", jobs["build"], "rewards.2.params.x=.nan")  # untyped places too: manifests stay strict JSON
    train = {**jobs["train"], "learning_rate": "nan"}
    assert "config.learning_rate must be a finite number, got 'nan'" in synpref("train", train)
    assert "config.filter.thresholds.0.min must be a finite number" in synpref(
        "filter", jobs["filter"], "filter.thresholds.0.min=-.inf")


@pytest.mark.parametrize("command, key", [("build", "output.output_dir"), ("filter", "output.output_dir"),
                                          ("train", "output_dir")])
def test_empty_or_null_output_locations_are_config_errors(synpref, jobs, command, key):
    for value in ("", "null", "' '"):
        line = synpref(command, jobs[command], f"{key}={value}")
        assert f"config.{key} must not be empty" in line, line


def test_train_without_locations_names_every_missing_key(synpref, jobs):
    job = {k: v for k, v in jobs["train"].items() if k not in ("output_dir", "pretrained_model")}
    assert "config: missing required config keys ['output_dir', 'pretrained_model']" in synpref("train", job)


def test_set_beyond_a_list_or_into_a_scalar_is_one_line(synpref, jobs):
    assert synpref("build", jobs["build"], "generators.5.model=x") == (
        "synpref build: --set generators.5.model: generators has 2 item(s) (indices 0..1), no item 5")
    assert "generators is a list: use an index 0..1, not 'first'" in synpref(
        "build", jobs["build"], "generators.first.model=x")
    assert "--set seed.value: seed is 0, not a mapping or a list" in synpref("build", jobs["build"], "seed.value=1")
    assert "--set expects KEY=VALUE" in synpref("filter", jobs["filter"], "output.output_dir")


def test_generator_settings_fail_at_config_time_not_when_the_job_runs(synpref, jobs):
    assert "config.generators.0.num_inference_steps must be >= 1, got 0" in synpref(
        "build", jobs["build"], "generators.0.num_inference_steps=0")
    line = synpref("build", jobs["build"], "generators.1.scheduler=EulerDiscreteSchedular")
    assert "generator tiny-sd-b: unknown diffusers scheduler 'EulerDiscreteSchedular'" in line
    # the name must be a diffusers scheduler class, not any diffusers attribute
    assert "unknown diffusers scheduler 'UNet2DModel'" in synpref("build", jobs["build"],
                                                                  "generators.1.scheduler=UNet2DModel")


def test_train_resolution_follows_the_build_multiple_of_8_rule(synpref, jobs):
    assert "config.resolution must be a multiple of 8 (the VAE downsamples by 8), got 63" in synpref(
        "train", jobs["train"], "resolution=63")
    assert "config.eval_resolution must be a multiple of 8" in synpref("train", jobs["train"], "eval_resolution=100")


def test_plugin_names_list_the_registered_ones(synpref, jobs):
    assert "config.rewards.1.name: unknown reward 'brisk'; available: [" in synpref(
        "build", jobs["build"], "rewards.1.name=brisk")
    assert "config.ranking.aggregator: unknown aggregator 'borda'; available: [" in synpref(
        "build", jobs["build"], "ranking.aggregator=borda")
    assert "config.rewards.1.name: unknown reward 'colorfulness'; available: [" in synpref(
        "filter", jobs["filter"], "rewards.1.name=colorfulness", "filter.top_fraction=null")


def test_every_command_takes_the_same_dotted_set_grammar(tmp_path, jobs):
    """Train's keys are top-level, so the one dotted grammar covers its old flat ``--set key=value``;
    list items by index work for every command."""
    from synpref.schemas.config import BuildConfig
    from synpref.schemas.filter_config import FilterJobConfig
    from synpref.schemas.loading import load_config
    from synpref.training.config import TrainConfig

    paths = {name: tmp_path / f"{name}.yaml" for name in jobs}
    for name, job in jobs.items():
        paths[name].write_text(yaml.safe_dump(job))
    train = load_config(TrainConfig, str(paths["train"]), ["learning_rate=1e-5", "shards=[a.tar, b.tar]",
                                                      "eval_rewards=[{name: sharpness}]"])
    assert (train.learning_rate, train.shards, train.eval_rewards[0].name) == (1e-5, ["a.tar", "b.tar"], "sharpness")
    build = load_config(BuildConfig, str(paths["build"]), ["generators.1.model=org/name", "filter.min_grey_sd=3"])
    assert (build.generators[1].model, build.filter.min_grey_sd) == ("org/name", 3.0)
    filt = load_config(FilterJobConfig, str(paths["filter"]), ["filter.thresholds.1.min=0.5", "input.source=x/*.tar"])
    assert (filt.filter.thresholds[1].min, filt.input.source) == (0.5, ("x/*.tar",))


def test_the_resolved_config_is_dumped_as_strict_json_the_same_way_everywhere(jobs):
    from synpref.schemas.config import BuildConfig
    from synpref.schemas.filter_config import FilterJobConfig
    from synpref.schemas.loading import dump_config
    from synpref.training.config import TrainConfig

    for cls, job in ((BuildConfig, jobs["build"]), (FilterJobConfig, jobs["filter"]), (TrainConfig, jobs["train"])):
        dumped = dump_config(cls.from_dict(job))
        text = json.dumps(dumped, allow_nan=False)  # strict JSON, or this raises
        assert cls.from_dict(json.loads(text)) == cls.from_dict(job)  # and it loads back to the same config


def test_a_config_mistake_from_the_installed_command_is_one_line(tmp_path, jobs):
    """The same through a new process: what a user sees on the terminal."""
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({**jobs["train"], "learning_rate": "nan"}))
    proc = subprocess.run([sys.executable, "-m", "synpref.cli", "train", "--config", "train.yaml",
                           "--set", "resolution=63"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == ["synpref train: config.learning_rate must be a finite number, got 'nan'; "
                                        "config.resolution must be a multiple of 8 (the VAE downsamples by 8), "
                                        "got 63"]
