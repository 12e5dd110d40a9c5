"""The ``synpref`` command as a user runs it: demo end to end (build, train, evaluate), then inspect."""
import json
import os
import subprocess
import sys

from diffusers import StableDiffusionPipeline


def synpref(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "synpref.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_demo_builds_trains_and_reports_where_everything_is(tmp_path):
    proc = synpref("demo", "--workdir", "demo", "--num-prompts", "5", "--train-steps", "2", cwd=tmp_path)
    out = proc.stdout
    assert "== synpref build: done ==" in out and "== synpref train: done ==" in out
    assert "prompts     in     64  written      5 groups  dropped 59 (not_sampled=59)" in out
    assert "ledger      balanced" in out
    assert "[generate] 20/20 images (100%)" in proc.stderr  # progress lines: done/total, rate
    assert "manifest    demo/build/manifest.json" in out

    summary = json.loads((tmp_path / "demo/train/train_summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "demo/models/tiny-sd-a"))
    pipe.load_lora_weights(str(tmp_path / "demo/train"))
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())

    # the demo ends by evaluating its LoRA against the base (jobs/demo_eval.yaml), on the demo's prompts
    assert "== synpref evaluate: 5 prompts, 10 images per model ==" in out and "tuned vs base" in out
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "demo/eval/samples.parquet").to_pylist()
    assert len(rows) == 20 and {r["model"] for r in rows} == {"base", "tuned"}
    manifest = json.loads((tmp_path / "demo/build/manifest.json").read_text())
    ranked_by = [r["name"] for r in manifest["rewards"] if r["rank"]]
    run = json.loads((tmp_path / "demo/eval/run_summary.json").read_text())
    assert run["training_rewards"] == {"tuned": ranked_by}  # traced: train_summary.json -> shards -> manifest
    evaluation = json.loads((tmp_path / "demo/eval/summary.json").read_text())
    assert evaluation["gamed_judges"] == [j for j in ("brisque", "sharpness") if j in ranked_by]

    report = synpref("inspect", "demo/build", cwd=tmp_path).stdout
    assert "verify: OK, every shard re-read matches the manifest" in report
    assert "prompts     in     64  written      5" in report

    import yaml

    from synpref.demo.run import demo_config

    (tmp_path / "train.yaml").write_text(yaml.safe_dump(demo_config("demo_train.yaml", "demo")))
    trained = synpref("train", "--config", "train.yaml", "--set", "max_steps=1", "--set", "loss=dpo",
                      "--set", "output_dir=train_dpo", cwd=tmp_path).stdout
    assert "loss        dpo first" in trained and "train_dpo/pytorch_lora_weights.safetensors" in trained


def test_build_command_takes_overrides_and_beam_flags(tmp_path, demo_models):
    import yaml

    from conftest import tiny_build_config

    cfg = tiny_build_config(demo_models, "out", prompts={"source": "builtin", "num_prompts": 2})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proc = synpref("build", "--config", "job.yaml", "--set", "seed=3", "--set", "output.output_dir=out3",
                   "--direct_num_workers=1", cwd=tmp_path)
    manifest = json.loads((tmp_path / "out3/manifest.json").read_text())
    assert manifest["config"]["seed"] == 3 and manifest["counts"]["prompts"]["written"] == 2
    assert "out3/manifest.json" in proc.stdout


def test_config_mistakes_and_unfinished_outputs_get_one_line_errors(tmp_path):
    (tmp_path / "job.yaml").write_text("generators: []\nrewards: []\nprompts: {}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args, message in ((["build", "--config", "job.yaml"], "synpref build: config needs at least one generator"),
                          (["inspect", "nowhere"], "synpref inspect: no manifest.json in nowhere")):
        proc = subprocess.run([sys.executable, "-m", "synpref.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_that_does_not_load_fails_in_one_line(demo_models, tmp_path):
    """A damaged checkpoint fails the job on the worker: one line naming the step and the error, exit 1."""
    import glob
    import shutil

    import yaml
    from conftest import tiny_build_config

    bad = tmp_path / "bad-sd"
    shutil.copytree(demo_models["tiny-sd-a"], bad)
    for f in glob.glob(f"{bad}/unet/*.safetensors"):
        open(f, "wb").write(b"not a checkpoint")
    cfg = tiny_build_config(demo_models, tmp_path / "out")
    cfg["generators"][0]["model"] = str(bad)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "synpref.cli", "build", "--config", "job.yaml"], cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("synpref build:")]
    assert len(errors) == 1 and errors[0].startswith("synpref build: Generate[tiny-sd-a] failed: OSError:")
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) <= 3


def test_check_models_lists_every_location_and_names_the_missing_ones(demo_models, tmp_path):
    import yaml
    from conftest import tiny_build_config

    cfg = tiny_build_config(demo_models, tmp_path / "out")
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    cfg["rewards"].append({"name": "vlm_judge", "params": {"model": "Qwen/Qwen2-VL-2B-Instruct"}})
    cfg["rewards"][0]["params"]["checkpoint"] = str(tmp_path / "gone.safetensors")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    run = lambda name: subprocess.run([sys.executable, "-m", "synpref.cli", "check-models", "--config", name],
                                      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    ok = run("ok.yaml")
    assert ok.returncode == 0 and "4 model locations, 0 missing" in ok.stdout
    bad = run("bad.yaml")
    assert bad.returncode == 2 and "missing" in bad.stdout.splitlines()[-1]
    missing = [ln for ln in bad.stdout.splitlines() if ln.startswith("MISSING")]
    assert any("reward clip_score: checkpoint" in ln and "gone.safetensors" in ln for ln in missing)
    assert any("reward vlm_judge: model" in ln and "HF_HUB_OFFLINE" in ln for ln in missing)
    build = subprocess.run([sys.executable, "-m", "synpref.cli", "build", "--config", "bad.yaml"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 2 and build.stderr.strip().splitlines()[-1].startswith("synpref build: reward clip_score: checkpoint")


def test_demo_into_a_folder_holding_someone_elses_files_is_one_line_exit_2(tmp_path):
    """A stage's folder that is not that stage's output (here the build's) refuses the demo in one line, the
    user's file untouched: run_demo's refusals reach the user as CLI errors, not tracebacks."""
    (tmp_path / "demo/build").mkdir(parents=True)
    (tmp_path / "demo/build/notes.txt").write_text("mine")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "synpref.cli", "demo", "--workdir", "demo", "--num-prompts", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("synpref demo: ") and "not a synpref build output" in last and "--workdir" in last
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "demo/build/notes.txt").read_text() == "mine"
