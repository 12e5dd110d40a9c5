"""``synpref run``: build -> train -> evaluate as one job, rounds, and a rerun that skips exactly the stages
whose inputs did not change. Expected stage outcomes are read from each stage's own output files."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from synpref.cli import main


def run_config(models, out, **over):
    base = models["tiny-sd-a"]
    cfg = {
        "base_model": base, "output_dir": str(out), "seed": 0, "rounds": 1,
        "build": {"candidates_per_generator": 2, "prompts": {"source": "builtin", "num_prompts": 4},
                  "generators": [{"id": "a", "num_inference_steps": 2, "guidance_scale": 5.0, "height": 64,
                                  "width": 64}],
                  "rewards": [{"name": "jpeg_compressibility"}, {"name": "sharpness"}],
                  "output": {"samples_per_shard": 4}},
        "train": {"max_steps": 2, "batch_size": 2, "resolution": 64, "torch_threads": 1},
        "evaluate": {"prompts": {"source": "builtin", "num_prompts": 3}, "seeds_per_prompt": 1,
                     "sampling": {"num_inference_steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64},
                     "judges": [{"name": "sharpness"}]},
    }
    cfg.update(over)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def stage_records(out):
    return {os.path.relpath(os.path.join(d, f), out): json.load(open(os.path.join(d, f)))
            for d, _, files in os.walk(out) for f in files if f == "_synpref_stage.json"}


@pytest.mark.slow
def test_two_rounds_generate_on_policy_and_a_rerun_skips_what_did_not_change(demo_models, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = run_config(demo_models, out, rounds=2, train_from="previous")
    assert main(["run", "--config", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "round 2 evaluate  done" in text and "round2 vs base" in text
    records = stage_records(out)
    assert sorted(records) == [f"round-{r}/{s}/_synpref_stage.json" for r in (1, 2) for s in ("build", "eval", "train")]
    # round 2 generated its candidates with round 1's LoRA: the build's manifest says so
    manifest = json.load(open(out / "round-2/build/manifest.json"))
    assert manifest["config"]["generators"][0]["lora"] == str(out / "round-1/train")
    round1 = json.load(open(out / "round-1/build/manifest.json"))
    assert "lora" not in round1["config"]["generators"][0] or not round1["config"]["generators"][0]["lora"]
    # round 2 trained on from round 1's LoRA (train_from: previous)
    trained = json.load(open(out / "round-2/train/train_summary.json"))
    assert trained["config"]["init_lora"] == str(out / "round-1/train")
    # the evaluation compared base, round 2 and round 1, on the same seeds
    summary = json.load(open(out / "round-2/eval/summary.json"))
    assert json.dumps(summary).count("round1") and json.dumps(summary).count("round2")
    # the recorded train outcome is the sha256 of the LoRA file the trainer wrote
    import hashlib

    lora = out / "round-1/train/pytorch_lora_weights.safetensors"
    recorded = records["round-1/train/_synpref_stage.json"]["outcome"]["weights_sha256"]
    expected = hashlib.sha256(json.dumps({"pytorch_lora_weights.safetensors": hashlib.sha256(lora.read_bytes()).hexdigest()},
                                         sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert recorded == expected

    # unchanged rerun: every stage skipped, same records
    assert main(["run", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.count("skipped (up to date)") == 6  # build, train and evaluate of 2 rounds
    assert stage_records(out) == records

    # a training change: builds are kept, every train and evaluate reruns, round 2's build too (new weights)
    cfg2 = run_config(demo_models, out, rounds=2, train_from="previous",
                      train={"max_steps": 3, "batch_size": 2, "resolution": 64, "torch_threads": 1})
    assert main(["run", "--config", str(cfg2)]) == 0
    after = stage_records(out)
    assert after["round-1/build/_synpref_stage.json"] == records["round-1/build/_synpref_stage.json"]
    for stage in ("round-1/train", "round-1/eval", "round-2/build", "round-2/train", "round-2/eval"):
        assert after[f"{stage}/_synpref_stage.json"]["key"] != records[f"{stage}/_synpref_stage.json"]["key"], stage


@pytest.mark.slow
def test_a_run_killed_in_training_finishes_with_the_uninterrupted_results(demo_models, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["run", "--config", str(run_config(demo_models, straight))]) == 0
    cfg = run_config(demo_models, killed)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "synpref.cli", "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = killed / "round-1/build/_synpref_stage.json"
    deadline = time.monotonic() + 600
    while not record.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the build is done; training is starting or running
    proc.wait()
    assert not (killed / "round-1/eval/_synpref_stage.json").exists()
    assert main(["run", "--config", str(cfg)]) == 0
    for rel in ("round-1/train/pytorch_lora_weights.safetensors", "round-1/eval/samples.parquet"):
        assert (killed / rel).read_bytes() == (straight / rel).read_bytes(), rel
    s1 = json.load(open(straight / "round-1/eval/summary.json"))
    s2 = json.load(open(killed / "round-1/eval/summary.json"))
    assert s1["comparisons"] == s2["comparisons"] if "comparisons" in s1 else s1 == s2


def test_a_section_may_not_set_what_the_run_owns(demo_models, tmp_path, capsys):
    cfg = run_config(demo_models, tmp_path / "r", train={"output_dir": "elsewhere"})
    assert main(["run", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "output_dir is set by synpref run" in err and "Traceback" not in err
