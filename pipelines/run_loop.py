"""``synpref run``: prompts -> dataset -> trained -> evaluated model, as one resumable job.

Each round is three stages, each the command of the same name run on a config the run derives from its
sections: build (round r > 1 generates with round r-1's tuned model), train (on that build's shards) and
evaluate (the base, this round's model, and round r-1's). A stage's output folder records the key it was
made for (``_synpref_stage.json``): a hash of the stage's config and of what it read (the build's run
fingerprint, the trained weights' sha256). A rerun skips a stage whose key matches and reruns the others,
which resume on their own (the build's staging, the trainer's checkpoints, evaluate's staging), so a run
killed in any stage finishes with the results an uninterrupted run has. See docs/run.md.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import fsspec

from ..core.errors import pipeline_failure
from ..core.fileio import write_atomic
from ..schemas.run_config import RunConfig

log = logging.getLogger("synpref.run")

STAGE_RECORD = "_synpref_stage.json"
STAGE_FORMAT = "1"  # bump when what a stage record promises changes


class StageFailed(RuntimeError):
    """A stage ran and failed: the run stops there (exit 1), naming the stage."""


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_checksum(train_dir: str) -> str:
    """sha256 over the trained weights a later stage loads (the LoRA file, or every file of a full denoiser)."""
    fs, root = fsspec.core.url_to_fs(train_dir)
    files = sorted(p for p in fs.find(root) if p.endswith(".safetensors") and "/checkpoint-" not in p)
    if not files:
        raise StageFailed(f"no trained weights (*.safetensors) in {train_dir}")
    return digest({os.path.relpath(p, root): file_sha256(fs.unstrip_protocol(p)) for p in files})


@dataclass
class Stage:
    """One step of the run: where its output goes, the key it is made for, and how to make it."""

    name: str
    folder: str
    config: dict[str, Any]
    inputs: dict[str, str]  # what it reads, by fingerprint
    make: Callable[[], dict[str, Any]]
    key: str = field(init=False)

    def __post_init__(self):
        self.key = digest({"format": STAGE_FORMAT, "stage": self.name.split()[-1], "config": self.config,
                           "inputs": self.inputs})


def _record_path(stage: Stage) -> str:
    return f"{stage.folder.rstrip('/')}/{STAGE_RECORD}"


def finished_outcome(stage: Stage) -> Optional[dict[str, Any]]:
    """The outcome recorded for exactly this key, or None (no record, another key, unreadable)."""
    try:
        with fsspec.open(_record_path(stage), "rb") as f:
            record = json.load(f)
    except (FileNotFoundError, ValueError, OSError):
        return None
    return record.get("outcome") if record.get("key") == stage.key else None


def run_stage(stage: Stage) -> tuple[dict[str, Any], bool]:
    """(outcome, skipped): the recorded outcome when the key matches, else the stage's fresh run."""
    done = finished_outcome(stage)
    if done is not None:
        log.info("%s: up to date (key %s), skipped", stage.name, stage.key[:12])
        return done, True
    fs, path = fsspec.core.url_to_fs(_record_path(stage))
    if fs.exists(path):  # made for another key: while this stage runs, nothing claims it is done
        fs.rm(path)
    log.info("%s: running (key %s)", stage.name, stage.key[:12])
    try:
        outcome = stage.make()
    except StageFailed as e:
        raise StageFailed(f"{stage.name} failed: {e}") from e
    except Exception as e:  # the stage's own job failed: one line naming the stage and the error
        raise StageFailed(f"{stage.name} failed: {pipeline_failure(e)}") from e
    write_atomic(_record_path(stage), json.dumps({"key": stage.key, "stage": stage.name, "outcome": outcome},
                                                 indent=2, sort_keys=True, allow_nan=False).encode())
    return outcome, False


# ---- the configs each stage gets
def build_section(cfg: RunConfig, r: int, folder: str, previous_weights: Optional[str]) -> dict[str, Any]:
    data = copy.deepcopy(cfg.build)
    data.setdefault("seed", cfg.seed)
    data.setdefault("output", {})["output_dir"] = f"{folder}/build"
    data["beam_options"] = list(cfg.beam_options)
    for gen in data.get("generators") or []:
        gen.setdefault("model", cfg.base_model)
        if previous_weights and gen["model"] == cfg.base_model:  # on-policy: the tuned model generates
            gen["lora"] = previous_weights
    return data


def train_section(cfg: RunConfig, folder: str, shards: str, previous_weights: Optional[str]) -> dict[str, Any]:
    data = copy.deepcopy(cfg.train)
    data.update(pretrained_model=cfg.base_model, shards=[shards], output_dir=f"{folder}/train")
    data.setdefault("seed", cfg.seed)
    if previous_weights and cfg.train_from == "previous":
        data["init_lora"] = previous_weights
    return data


def evaluate_section(cfg: RunConfig, r: int, folder: str, weights: dict[int, str]) -> dict[str, Any]:
    data = copy.deepcopy(cfg.evaluate)
    sampling = data.pop("sampling", {}) or {}
    models = [{"name": "base", "model": cfg.base_model, **sampling},
              {"name": f"round{r}", "model": cfg.base_model, "lora": weights[r], **sampling}]
    if r > 1:
        models.append({"name": f"round{r - 1}", "model": cfg.base_model, "lora": weights[r - 1], **sampling})
    data.update(models=models, output_dir=f"{folder}/eval", beam_options=list(cfg.beam_options))
    data.setdefault("seed", cfg.seed)
    return data


# ---- the stages themselves (each calls the command's own entry point)
def _build(data: dict[str, Any], beam_args: list[str]) -> dict[str, Any]:
    from ..schemas.config import build_config_from_dict
    from .build_preferences import build

    result = build(build_config_from_dict(data), beam_args)
    problems = result["summary"].get("problems") or []
    if problems:
        raise StageFailed("; ".join(problems))
    manifest = result["manifest"]
    return {"run_fingerprint": manifest["run_fingerprint"], "counts": manifest["counts"],
            "up_to_date": bool(result["summary"].get("up_to_date"))}


def _train(data: dict[str, Any]) -> dict[str, Any]:
    from ..training.config import TrainConfig
    from ..training.preflight import preflight_train
    from ..training.train import train

    cfg = TrainConfig.from_dict(data)
    preflight_train(cfg)
    summary = train(cfg)
    if not summary["steps"]:
        raise StageFailed("no training step ran")
    return {"weights_sha256": weights_checksum(data["output_dir"]), "steps": summary["steps"],
            "first_loss": summary["first_loss"], "last_loss": summary["last_loss"]}


def _evaluate(data: dict[str, Any], beam_args: list[str]) -> dict[str, Any]:
    from ..schemas.eval_config import eval_config_from_dict
    from .evaluate import evaluate

    result = evaluate(eval_config_from_dict(data), beam_args)
    if result["run"].get("problems"):
        raise StageFailed("; ".join(result["run"]["problems"]))
    return {"summary": result["summary"], "text": result["text"]}


def preflight_run(cfg: RunConfig) -> None:
    """Every stage's config is valid before anything runs (round 1's; later rounds differ only in the
    weights an earlier round writes). One-line ValueError otherwise."""
    from ..schemas.config import build_config_from_dict
    from ..schemas.eval_config import eval_config_from_dict
    from ..training.config import TrainConfig
    from .preflight import preflight

    folder = f"{cfg.output_dir.rstrip('/')}/round-1"
    for name, check in (("build", lambda: preflight(build_config_from_dict(build_section(cfg, 1, folder, None)))),
                        ("train", lambda: TrainConfig.from_dict(train_section(cfg, folder, f"{folder}/build/ranked", None))),
                        ("evaluate", lambda: eval_config_from_dict(evaluate_section(cfg, 1, folder, {1: folder + "/train"})))):
        try:
            check()
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{name}: {' '.join(str(e).split())}") from None


def run_loop(cfg: RunConfig, beam_args: Optional[list[str]] = None) -> dict[str, Any]:
    """Run every round; returns ``{"rounds": [{stage: {"outcome", "skipped"}}]}``, also in run_summary.json."""
    beam_args = list(beam_args or [])
    root = cfg.output_dir.rstrip("/")
    rounds: list[dict[str, Any]] = []
    weights: dict[int, str] = {}
    sums: dict[int, str] = {}
    for r in range(1, cfg.rounds + 1):
        folder = f"{root}/round-{r}"
        prev = weights.get(r - 1)
        prev_inputs = {"previous_weights": sums[r - 1]} if prev else {}
        done: dict[str, Any] = {}
        b = build_section(cfg, r, folder, prev)
        stage = Stage(f"round {r} build", f"{folder}/build", b, prev_inputs, lambda b=b: _build(b, beam_args))
        out, skipped = run_stage(stage)
        done["build"] = {"outcome": out, "skipped": skipped}
        data_format = cfg.train.get("data_format", "ranked")
        t = train_section(cfg, folder, f"{folder}/build/{'pairs' if data_format == 'pairs' else 'ranked'}", prev)
        stage = Stage(f"round {r} train", f"{folder}/train", t,
                      {"build": out["run_fingerprint"], **(prev_inputs if cfg.train_from == "previous" else {})},
                      lambda t=t: _train(t))
        out, skipped = run_stage(stage)
        done["train"] = {"outcome": out, "skipped": skipped}
        weights[r], sums[r] = t["output_dir"], out["weights_sha256"]
        e = evaluate_section(cfg, r, folder, weights)
        stage = Stage(f"round {r} evaluate", f"{folder}/eval", e,
                      {f"round{k}": sums[k] for k in sorted(sums) if k >= r - 1}, lambda e=e: _evaluate(e, beam_args))
        out, skipped = run_stage(stage)
        done["evaluate"] = {"outcome": out, "skipped": skipped}
        rounds.append(done)
    result = {"rounds": rounds}
    write_atomic(f"{root}/run_summary.json", json.dumps(result, indent=2, sort_keys=True, allow_nan=False).encode())
    return result


def format_run_loop(result: dict[str, Any]) -> str:
    """Each stage's outcome, then each round's evaluation table."""
    lines = ["== synpref run: done =="]
    for r, stages in enumerate(result["rounds"], 1):
        b, t = stages["build"]["outcome"], stages["train"]["outcome"]
        state = lambda s: "skipped (up to date)" if stages[s]["skipped"] else "done"
        c = b["counts"]
        lines.append(f"round {r} build     {state('build')}: {c['prompts']['written']} prompts, "
                     f"{c['candidates']['written']} images, {c['pairs']['written']} pairs")
        lines.append(f"round {r} train     {state('train')}: {t['steps']} steps, loss {t['first_loss']:.5f} -> "
                     f"{t['last_loss']:.5f}, weights sha256 {t['weights_sha256'][:12]}")
        lines.append(f"round {r} evaluate  {state('evaluate')}")
        lines.append(stages["evaluate"]["outcome"]["text"].rstrip())
    return "\n".join(lines)
