"""Input and config mistakes: a one-line error (exit 2) before any pipeline work, or one dropped record."""
import logging
import warnings

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from conftest import tiny_build_config
from synpref.demo.run import demo_config
from synpref.pipelines.preflight import preflight
from synpref.schemas.config import PromptsConfig, load_build_config
from synpref.transforms.prompts import ReadPrompts, _Clean, read_raw_prompts



def job(tmp_path, models, **overrides) -> str:
    """Write a tiny build config as YAML; return its path."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_build_config(models, tmp_path / "out", **overrides)))
    return str(path)


def preflight_error(path: str, *sets: str) -> str:
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        preflight(load_build_config(path, list(sets)))
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``synpref build`` in-process; return its single stderr line. The pipeline must never start."""
    import synpref.runs.pipeline_run as pipeline_run
    from synpref.cli import main

    def no_pipeline(*args, **kwargs):
        raise AssertionError("the pipeline started: the error was not caught before any work")

    monkeypatch.setattr(pipeline_run, "locked_output", no_pipeline)  # taking the folder's lock is the first work
    root_level = logging.getLogger().level

    def run(path: str, *sets: str) -> str:
        capsys.readouterr()
        with warnings.catch_warnings():  # main() sets process-wide logging/warning filters
            code = main(["build", "--config", path, *[a for s in sets for a in ("--set", s)]])
        logging.getLogger().setLevel(root_level)
        err = capsys.readouterr().err
        assert code == 2, err
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("synpref build: "), err
        return lines[0]

    return run


# 1. missing prompts file

def test_missing_prompt_file_is_named(tmp_path, demo_models):
    missing = str(tmp_path / "no" / "such.txt")
    path = job(tmp_path, demo_models, prompts={"source": missing})
    assert missing in preflight_error(path)


def test_cli_missing_prompt_file(tmp_path, demo_models, cli):
    missing = str(tmp_path / "no" / "such.txt")
    assert missing in cli(job(tmp_path, demo_models), f"prompts.source={missing}")


# 2. unknown extension

def test_unknown_prompt_format_asks_for_prompts_format(tmp_path, demo_models):
    (tmp_path / "p.xlsx").write_bytes(b"PK\x03\x04 not really a spreadsheet")
    message = preflight_error(job(tmp_path, demo_models, prompts={"source": str(tmp_path / "p.xlsx")}))
    assert "p.xlsx" in message and "prompts.format" in message


def test_cli_unknown_prompt_format(tmp_path, demo_models, cli):
    (tmp_path / "p.xlsx").write_bytes(b"PK\x03\x04")
    assert "prompts.format" in cli(job(tmp_path, demo_models), f"prompts.source={tmp_path / 'p.xlsx'}")


# 3. output folder that cannot be created (tests run as root, so a file in the way, not chmod)

def test_output_dir_under_a_regular_file(tmp_path, demo_models):
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "out")
    message = preflight_error(job(tmp_path, demo_models), f"output.output_dir={out}")
    assert "output.output_dir" in message and out in message


def test_writable_output_dir_is_created_and_left_clean(tmp_path, demo_models):
    out = tmp_path / "new" / "out"
    preflight(load_build_config(job(tmp_path, demo_models), [f"output.output_dir={out}"]))
    assert out.is_dir() and list(out.iterdir()) == []


def test_cli_output_dir_under_a_regular_file(tmp_path, demo_models, cli):
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "afile" / "out")
    assert out in cli(job(tmp_path, demo_models), f"output.output_dir={out}")


# 4. one bad byte in a CSV drops that row only

CSV_WITH_BAD_ROW = b"prompt,category\na red cube,colour\ncaf\xe9 on a table,scene\ntwo green apples,counting\n"


def test_csv_row_with_bad_utf8_is_dropped_alone(tmp_path):
    src = tmp_path / "p.csv"
    src.write_bytes(CSV_WITH_BAD_ROW)
    outputs = [out for raw in read_raw_prompts(PromptsConfig(source=str(src))) for out in _Clean(300).process(raw)]
    kept = [(o.prompt, o.category) for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]
    dropped = [(o.value.reason, o.value.record_id) for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
    assert kept == [("a red cube", "colour"), ("two green apples", "counting")]
    assert dropped == [("non_utf8", f"{src}#1")]  # second data row


def test_csv_bad_row_in_the_pipeline(tmp_path):
    src = tmp_path / "p.csv"
    src.write_bytes(CSV_WITH_BAD_ROW)
    with TestPipeline() as p:
        r = p | ReadPrompts(PromptsConfig(source=str(src)), seed=0)
        assert_that(r["prompts"] | beam.Map(lambda x: x.prompt), equal_to(["a red cube", "two green apples"]))
        assert_that(r["dropped"] | beam.Map(lambda d: (d.reason, d.record_id)),
                    equal_to([("non_utf8", f"{src}#1")]), label="drops")


# 5. BOM before the header; header without text_field (CSV and parquet)

def test_csv_with_utf8_bom_finds_the_prompt_column(tmp_path, demo_models):
    src = tmp_path / "p.csv"
    src.write_bytes(b"\xef\xbb\xbfprompt,category\na red cube,colour\n")
    raw = list(read_raw_prompts(PromptsConfig(source=str(src))))
    assert [(r.text, r.category) for r in raw] == [("a red cube", "colour")]
    preflight(load_build_config(job(tmp_path, demo_models, prompts={"source": str(src)})))  # no error


def test_csv_without_the_text_column_lists_its_columns(tmp_path, demo_models):
    src = tmp_path / "p.csv"
    src.write_text("text,id\na red cube,1\n")
    message = preflight_error(job(tmp_path, demo_models, prompts={"source": str(src)}))
    assert f"{src} has no column 'prompt' (columns: text, id)" in message and "prompts.text_field" in message


def test_parquet_without_the_text_column_lists_its_columns(tmp_path, demo_models):
    src = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"caption": "a red cube", "n": 1}]), src)
    message = preflight_error(job(tmp_path, demo_models, prompts={"source": str(src)}))
    assert f"{src} has no column 'prompt' (columns: caption, n)" in message


def test_parquet_with_the_configured_text_field_passes(tmp_path, demo_models):
    src = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"caption": "a red cube"}]), src)
    preflight(load_build_config(job(tmp_path, demo_models, prompts={"source": str(src), "text_field": "caption"})))


def test_cli_csv_without_the_text_column(tmp_path, demo_models, cli):
    src = tmp_path / "p.csv"
    src.write_text("text,id\na red cube,1\n")
    assert "(columns: text, id)" in cli(job(tmp_path, demo_models), f"prompts.source={src}")


# 6-8. config values, checked by BuildConfig.validate()

CONFIG_ERRORS = [
    ("prompts.num_prompts=0", "prompts.num_prompts must be >= 1 or null"),
    ("prompts.num_prompts=-3", "prompts.num_prompts must be >= 1 or null"),
    ("generators.1.height=60", "generator tiny-sd-b: height and width must be positive multiples of 8"),
    ("generators.0.width=100", "generator tiny-sd-a: height and width must be positive multiples of 8"),
    ("prompts.max_chars=0", "prompts.max_chars must be >= 1"),
    ("filter.min_candidates=1", "filter.min_candidates must be >= 2"),
]


@pytest.mark.parametrize("override, message", CONFIG_ERRORS)
def test_bad_config_values(tmp_path, override, message):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(demo_config("demo_build.yaml", str(tmp_path))))
    with pytest.raises(ValueError) as err:
        load_build_config(str(path), [override])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", CONFIG_ERRORS[:1] + CONFIG_ERRORS[2:3])
def test_cli_bad_config_values(tmp_path, cli, override, message):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(demo_config("demo_build.yaml", str(tmp_path))))
    assert message in cli(str(path), override)


def test_size_rule_is_only_for_diffusers_generators(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(demo_config("demo_build.yaml", str(tmp_path))))
    cfg = load_build_config(str(path), ["generators.0.type=procedural", "generators.0.height=60"])
    assert cfg.generators[0].height == 60
