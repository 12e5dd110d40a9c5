"""Config errors say what is wrong and what is allowed."""
import pytest

from synpref.pipelines.preflight import check_plugins
from synpref.schemas.config import build_config_from_dict, load_build_config
from synpref.schemas.loading import apply_overrides
from synpref.demo.run import demo_config


def base():
    return demo_config("demo_build.yaml", "/tmp/synpref-demo")


def test_demo_config_parses_and_rebases_paths():
    cfg = build_config_from_dict(base())
    assert cfg.output.output_dir == "/tmp/synpref-demo/build"
    assert cfg.generators[0].model == "/tmp/synpref-demo/models/tiny-sd-a"
    assert [r.name for r in cfg.rewards] == ["clip_score", "brisque", "sharpness"]
    assert cfg.staging_dir == "/tmp/synpref-demo/build/_staging"


@pytest.mark.parametrize("override, message", [
    ({"prompts.nmu_prompts": 3}, "unknown key(s) ['nmu_prompts']"),
    ({"generators.0.dtype": "float8"}, "is not one of ['float32', 'float16', 'bfloat16']"),
    ({"generators.1.id": "tiny-sd-a"}, "generator ids must be unique"),
    ({"generators.0.id": "sd.xl"}, "may only use letters, digits"),
    ({"filter.min_agreement_margin": 0.5}, "min_agreement_margin must be in [0, 0.5)"),
])
def test_bad_configs_raise_clear_errors(override, message):
    with pytest.raises(ValueError) as err:
        build_config_from_dict(apply_overrides(base(), override))
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ({"rewards.0.name": "hpsv9"}, "config.rewards.0.name: unknown reward 'hpsv9'; available: "),
    ({"generators.0.type": "comfy"}, "config.generators.0.type: unknown generator type 'comfy'; available: "),
    ({"generators.1.scheduler": "NoSuchScheduler"}, "generator tiny-sd-b: unknown diffusers scheduler 'NoSuchScheduler'"),
])
def test_plugin_names_are_checked_where_the_pipeline_is_built(override, message):
    cfg = build_config_from_dict(apply_overrides(base(), override))  # the config module knows no plug-ins
    with pytest.raises(ValueError) as err:
        check_plugins(cfg)
    assert message in str(err.value)


def test_yaml_file_with_cli_style_overrides(tmp_path):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base()))
    cfg = load_build_config(str(path), ["seed=5", "output.samples_per_shard=3", "prompts.num_prompts=null"])
    assert (cfg.seed, cfg.output.samples_per_shard, cfg.prompts.num_prompts) == (5, 3, None)


def test_runner_job_configs_validate_and_beam_reads_their_flags():
    """jobs/dataflow_gpu.yaml, flink.yaml, spark.yaml: valid configs whose beam_options Beam parses."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

    from synpref.schemas.config import load_build_config

    expected = {"dataflow_gpu": "DataflowRunner", "flink": "PortableRunner", "spark": "PortableRunner"}
    for name, runner in expected.items():
        cfg = load_build_config(f"jobs/{name}.yaml")
        assert PipelineOptions(list(cfg.beam_options)).view_as(StandardOptions).runner == runner
    gpu = load_build_config("jobs/dataflow_gpu.yaml")
    assert all(g.accelerator.startswith("type:nvidia") for g in gpu.generators)
