"""Trainer step cost: our Diffusion-DPO / RankDPO step against diffusers' ``train_diffusion_dpo.py``.

    python bench/bench_trainer.py --diffusers-script DIFFUSERS/examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
        [--steps 24] [--pairs-per-step 4] [--resolution 64] [--prompts 16] [--repeats 3] [--threads 1] [--workdir DIR]

Without ``--diffusers-script`` the diffusers comparison is skipped (said so in the output). One tiny random
SD1.x pipeline (``jobs/tiny_models.save_tiny_sd_pipeline``) is saved to a temp dir and the same images are
written three ways: ranked shards with k = 4, ranked shards with k = 2 (the best and worst of those), and a
Pick-a-Pic style parquet folder (``caption``, ``jpg_0`` = preferred, ``jpg_1``, ``label_0`` = 1) that the
diffusers script loads offline with ``--dataset_name <folder>``. Every run is a fresh subprocess (so its
peak RSS, ``VmHWM`` from ``/proc/self/status``, is its own) with the same resolution, pairs per step, steps,
LoRA rank, learning rate, DPO strength (our beta 5000 x 0.5 = the script's ``--beta_dpo 2500``) and torch threads:

  (a) ours: ``loss: dpo``, ``dpo_pairs: best_worst`` on k = 2 shards, through ``synpref.training.train.train``;
  (b) diffusers' script, run unmodified through ``runpy`` (none of its code is in this file). The child
      imports accelerate first (so its tracker list is fixed), stubs ``wandb`` when it is not installed
      (the script imports it at the top even when unused), passes ``--report_to all`` (nothing installed:
      no tracker; the default, tensorboard, must be installed) and wraps tqdm to timestamp the "Steps" bar;
  (c) ours with ``cache_latents`` / ``cache_text_embeddings`` on, when ``TrainConfig`` has those fields;
  (d) ours ``loss: rankdpo`` on k = 4 shards (same prompts per step), against (a) per prompt.

Timing excludes model loading, warm-up and the cached run's cache fill: each child timestamps the end of
every optimiser step (our trainer's per-step log line; the script's tqdm ``update``), and the step time is
the median interval between step ends after the first pass over the data (``--prompts`` / pairs per step
steps). The configurations run ``--repeats`` times, interleaved, and the fastest median counts (the
machine is shared; only ratios from the same invocation mean anything).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOALS = {"ours_vs_diffusers": 1.0, "cached_speedup": 1.25, "rankdpo_k4_vs_dpo": 2.0}


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB; NaN where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def step_stats(stamps: list[float], warm: int) -> dict:
    """Median / mean seconds between consecutive step ends after step ``warm`` (loading, warm-up, cache fill)."""
    stamps = stamps[max(warm, 1) - 1:]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    if not gaps:
        return {"steps_timed": 0, "median_s": float("nan"), "mean_s": float("nan")}
    return {"steps_timed": len(gaps), "median_s": statistics.median(gaps), "mean_s": sum(gaps) / len(gaps)}


# ---------------------------------------------------------------- children (each a fresh process)
def child_ours(config_path: str, threads: int, result_path: str) -> None:
    """Run our trainer on a YAML config; record the end time of every optimiser step and the peak RSS."""
    import logging

    import torch

    torch.set_num_threads(threads)
    from synpref.schemas.loading import load_config
    from synpref.training.config import TrainConfig
    from synpref.training.train import train

    stamps: list[float] = []

    class StepClock(logging.Handler):
        def emit(self, record):  # train() logs "step %d/%d loss ..." after each optimiser step (log_every 1)
            if isinstance(record.msg, str) and record.msg.startswith("step %d/%d"):
                stamps.append(time.perf_counter())

    log = logging.getLogger("synpref.training")
    log.setLevel(logging.INFO)
    log.addHandler(StepClock())
    t0 = time.perf_counter()
    summary = train(load_config(TrainConfig, config_path))
    result = {
        "stamps": stamps, "steps": summary["steps"], "wall_s": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(), "last_loss": summary["last_loss"], "skipped": summary["skipped"],
    }
    Path(result_path).write_text(json.dumps(result))


def child_diffusers(script: str, script_args: list[str], threads: int, result_path: str) -> None:
    """Run diffusers' script unmodified (``runpy``); timestamp its "Steps" progress bar updates."""
    import importlib.util
    import runpy
    import types

    import torch

    torch.set_num_threads(threads)
    import accelerate.tracking  # noqa: F401  (lists the installed trackers now, before any stub below)

    if importlib.util.find_spec("wandb") is None:  # the script imports wandb at its top even when unused
        import importlib.machinery

        stub = types.ModuleType("wandb")
        stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        stub.Image = lambda *a, **k: None
        sys.modules["wandb"] = stub
    import tqdm.auto

    stamps: list[float] = []
    base = tqdm.auto.tqdm

    class ClockedTqdm(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self._clock = k.get("desc") == "Steps"  # the training-loop bar; datasets' bars are ignored

        def update(self, n=1):
            if self._clock:
                stamps.append(time.perf_counter())
            return super().update(n)

    tqdm.auto.tqdm = ClockedTqdm  # the script does ``from tqdm.auto import tqdm`` when it runs
    sys.argv = [script, *script_args]
    t0 = time.perf_counter()
    runpy.run_path(script, run_name="__main__")
    result = {"stamps": stamps, "steps": len(stamps), "wall_s": time.perf_counter() - t0,
              "peak_rss_mib": peak_rss_mib()}
    Path(result_path).write_text(json.dumps(result))


# ---------------------------------------------------------------- data
def build_data(work: Path, n_prompts: int, resolution: int) -> dict:
    """The same images as ranked k = 4 shards, ranked k = 2 shards (best, worst) and a Pick-a-Pic parquet."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)

    def png() -> bytes:
        # smooth random image (a small noise field upsampled), closer to a real picture than pixel noise
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((resolution, resolution), Image.BILINEAR).save(buf, format="PNG")
        return buf.getvalue()

    def sample(pid: str, prompt: str, imgs: list[bytes], phis: list[float]) -> dict:
        cands = [{"candidate_id": f"{pid}-{i}", "image": f"img{i}.png", "rank": i + 1, "phi": phi,
                  "scores": {"clip_score": 0.3 - 0.1 * i}, "lineage": {}} for i, phi in enumerate(phis)]
        meta = {"prompt_id": pid, "prompt": prompt, "category": "bench", "aggregator": "syn_pic",
                "rewards": ["clip_score"], "candidates": cands}
        return {"__key__": pid, "json": json.dumps(meta).encode(), **{f"img{i}.png": b for i, b in enumerate(imgs)}}

    paths = {"k2": work / "ranked-k2", "k4": work / "ranked-k4", "pickapic": work / "pickapic"}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    with wds.TarWriter(str(paths["k4"] / "ranked-00000.tar"), mtime=0) as k4, \
            wds.TarWriter(str(paths["k2"] / "ranked-00000.tar"), mtime=0) as k2:
        for i in range(n_prompts):
            pid, prompt = f"p{i:04d}", f"prompt {i}: a red cube on a blue sphere, photo"
            imgs = [png() for _ in range(4)]
            k4.write(sample(pid, prompt, imgs, [1.0, 2 / 3, 1 / 3, 0.0]))
            k2.write(sample(pid, prompt, [imgs[0], imgs[3]], [1.0, 0.0]))
            rows["caption"].append(prompt)
            rows["jpg_0"].append(imgs[0])  # preferred (label_0 = 1), as the k = 2 shards' rank 1
            rows["jpg_1"].append(imgs[3])
            rows["label_0"].append(1.0)
    table = pa.table({"caption": pa.array(rows["caption"], pa.string()), "jpg_0": pa.array(rows["jpg_0"], pa.binary()),
                      "jpg_1": pa.array(rows["jpg_1"], pa.binary()), "label_0": pa.array(rows["label_0"], pa.float64())})
    pq.write_table(table, str(paths["pickapic"] / "train-00000.parquet"))
    return {k: str(v) for k, v in paths.items()}


# ---------------------------------------------------------------- parent
def run_child(name: str, cmd: list[str], env: dict, result_path: Path, log_path: Path, warm: int) -> dict:
    """Run one child; return its step statistics (after step ``warm``), peak RSS and wall time, or an error."""
    result_path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"[{name}] FAILED (exit {proc.returncode}, {wall:.0f}s); log {log_path}:\n  " + "\n  ".join(tail), flush=True)
        return {"error": f"exit {proc.returncode}", "log": str(log_path)}
    raw = json.loads(result_path.read_text())
    result = {**step_stats(raw.pop("stamps"), warm), **raw, "process_wall_s": wall, "log": str(log_path)}
    print(f"[{name}] {wall:.0f}s: {result['steps']} steps, median step {result['median_s']:.3f}s over "
          f"{result['steps_timed']}, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def aggregate(runs: list[dict]) -> dict:
    """Across repeats: the fastest median step (least disturbed by other load), the largest peak RSS."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[-1]
    best = min(good, key=lambda r: r["median_s"])
    return {**best, "peak_rss_mib": max(r["peak_rss_mib"] for r in good),
            "median_s_all": [round(r["median_s"], 4) for r in good], "repeats_ok": len(good)}


def train_config_fields() -> set[str]:
    from synpref.training.config import TrainConfig

    return set(TrainConfig.model_fields)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--diffusers-script", default=None,
                    help="path to a diffusers checkout's examples/research_projects/diffusion_dpo/train_diffusion_dpo.py")
    ap.add_argument("--steps", type=int, default=24, help="optimiser steps per run")
    ap.add_argument("--pairs-per-step", type=int, default=4, help="prompts (= DPO pairs) per optimiser step")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16,
                    help="prompts in the data set (repeated as needed); the first pass over them is not timed "
                         "(warm-up, and the cached run fills its cache there)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration, interleaved; the fastest counts")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every run (1 is fastest on small CPUs)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--workdir", default=None, help="default: a new temp dir")
    # internal: child processes
    ap.add_argument("--child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--script-args", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child == "ours":
        return child_ours(args.config, args.threads, args.result)
    if args.child == "diffusers":
        return child_diffusers(args.diffusers_script, json.loads(args.script_args), args.threads, args.result)

    import yaml

    t_start = time.perf_counter()
    bs = args.pairs_per_step
    warm = max(1, math.ceil(args.prompts / bs))  # steps in the first pass over the data: not timed
    if args.steps < warm + 3:
        ap.error(f"--steps must be at least {warm + 3}: the first {warm} step(s) (one pass over --prompts) are not timed")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="synpref-bench-trainer-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    me = [sys.executable, str(Path(__file__).resolve())]
    print(f"$ {shlex.join([sys.executable, *sys.argv])}\nworkdir {work}", flush=True)

    from synpref.demo.tiny_models import save_tiny_sd_pipeline

    model = save_tiny_sd_pipeline(work / "tiny-sd", seed=0)
    data = build_data(work, args.prompts, args.resolution)
    fields = train_config_fields()

    specs: dict[str, list[str]] = {}  # run name -> child command
    equivalents: dict[str, str] = {}  # run name -> the plain command it stands for
    notes: list[str] = []

    def ours(name: str, shards: str, **kw) -> None:
        cfg = {"pretrained_model": model, "shards": [shards], "output_dir": str(work / f"out-{name}"),
               "resolution": args.resolution, "batch_size": bs, "max_steps": args.steps, "lora_rank": args.lora_rank,
               "learning_rate": args.learning_rate, "log_every": 1, "torch_threads": args.threads, "seed": 0, **kw}
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        specs[name] = [*me, "--child", "ours", "--config", str(path), "--threads", str(args.threads),
                       "--result", str(work / f"{name}.result.json")]
        equivalents[name] = shlex.join([sys.executable, "-m", "synpref.training.train", "--config", str(path)])

    # (a) ours, Diffusion-DPO on (rank 1, rank k) of k = 2 shards
    ours("ours_dpo_k2", data["k2"], loss="dpo", dpo_pairs="best_worst")

    # (b) diffusers' script on the same pairs
    if args.diffusers_script is None:
        print("[diffusers] SKIPPED: no --diffusers-script given (path to train_diffusion_dpo.py of a diffusers checkout)")
        notes.append("(b) skipped: no --diffusers-script")
    elif not Path(args.diffusers_script).is_file():
        print(f"[diffusers] SKIPPED: {args.diffusers_script} is not a file")
        notes.append(f"(b) skipped: {args.diffusers_script} not found")
    else:
        # Our dpo beta 5000 multiplies 0.5 * diff; the script's sigmoid loss has no 0.5, so beta_dpo 2500 is the same.
        # --report_to all: with no tracker installed accelerate logs nowhere (the default, tensorboard, must be installed).
        script_args = [
            "--pretrained_model_name_or_path", model, "--dataset_name", data["pickapic"],
            "--dataset_split_name", "train", "--cache_dir", str(work / "hf-datasets-cache"),
            "--resolution", str(args.resolution), "--train_batch_size", str(bs), "--max_train_steps", str(args.steps),
            "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--rank", str(args.lora_rank), "--beta_dpo", "2500", "--output_dir", str(work / "out-diffusers_dpo"),
            "--mixed_precision", "no", "--report_to", "all", "--seed", "0", "--no_hflip",
            "--checkpointing_steps", str(10 ** 9), "--dataloader_num_workers", "0",
        ]
        script = str(Path(args.diffusers_script).resolve())
        specs["diffusers_dpo"] = [*me, "--child", "diffusers", "--diffusers-script", script, "--threads", str(args.threads),
                                  "--result", str(work / "diffusers_dpo.result.json"), "--script-args", json.dumps(script_args)]
        equivalents["diffusers_dpo"] = shlex.join([sys.executable, script, *script_args])

    # (c) ours with latent / text-embedding caching, when the config has it
    cache_keys = [k for k in ("cache_latents", "cache_text_embeddings") if k in fields]
    if cache_keys:
        ours("ours_dpo_k2_cached", data["k2"], loss="dpo", dpo_pairs="best_worst", **{k: True for k in cache_keys})
        if len(cache_keys) < 2:
            notes.append(f"(c) only {cache_keys} exist in TrainConfig; the cached run sets just that")
    else:
        print("[cached] SKIPPED: TrainConfig has no cache_latents / cache_text_embeddings fields")
        notes.append("(c) skipped: TrainConfig has no cache_latents / cache_text_embeddings")

    # (d) RankDPO on k = 4 (same prompts per step)
    ours("ours_rankdpo_k4", data["k4"], loss="rankdpo")

    print("\nCommands (each run is a fresh process; the child wraps the plain command for timing / peak RSS):")
    for name, cmd in specs.items():
        print(f"  {name}:\n    plain: {equivalents[name]}\n    child: {shlex.join(cmd)}")
    print(flush=True)

    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for rep in range(args.repeats):  # interleaved, so slow phases of the shared machine hit every run alike
        for name, cmd in specs.items():
            runs[name].append(run_child(f"{name} #{rep + 1}", cmd, env, work / f"{name}.result.json",
                                        work / f"{name}.{rep + 1}.log", warm))
    results = {name: aggregate(r) for name, r in runs.items()}

    # ---------------------------------------------------------------- table
    rows = [("ours_dpo_k2", "(a) ours dpo best_worst", "ranked k=2", 2),
            ("diffusers_dpo", "(b) diffusers train_diffusion_dpo", "pickapic pairs", 2),
            ("ours_dpo_k2_cached", "(c) ours dpo + cache", "ranked k=2", 2),
            ("ours_rankdpo_k4", "(d) ours rankdpo", "ranked k=4", 4)]
    print(f"\nTiny SD1.x, {args.resolution}px, {bs} prompts (= pairs) per step, {args.steps} steps, timed after step "
          f"{warm} (one pass over {args.prompts} prompts), best of {args.repeats}, {args.threads} torch thread(s), CPU")
    head = (f"{'run':35} {'data':14} {'img/step':>8} {'step med s':>10} {'step mean s':>11} {'s/pair':>8} "
            f"{'s/prompt':>8} {'peak RSS MiB':>12}")
    print(head + "\n" + "-" * len(head))
    for key, label, dname, k in rows:
        r = results.get(key)
        if r is None:
            print(f"{label:35} {dname:14} skipped")
            continue
        if "error" in r:
            print(f"{label:35} {dname:14} FAILED ({r['error']}, log {r['log']})")
            continue
        per_prompt = r["median_s"] / bs
        pair = f"{per_prompt:>8.4f}" if k == 2 else f"{'-':>8}"  # rankdpo k=4 sums 6 pairs per prompt
        print(f"{label:35} {dname:14} {bs * k:>8} {r['median_s']:>10.3f} {r['mean_s']:>11.3f} "
              f"{pair} {per_prompt:>8.4f} {r['peak_rss_mib']:>12.0f}")

    def ok(key):
        return key in results and "error" not in results[key]

    def verdict(value, goal, le):
        return "met" if (value <= goal if le else value >= goal) else "NOT met"

    med = {k: r["median_s"] for k, r in results.items() if ok(k)}
    print("\nRatios (median step times, same run):")
    if "ours_dpo_k2" in med and "diffusers_dpo" in med:
        ratio = med["ours_dpo_k2"] / med["diffusers_dpo"]
        print(f"  (b) ours / diffusers, time per pair: {ratio:.2f}x  (goal <= {GOALS['ours_vs_diffusers']:.2f}x: "
              f"{verdict(ratio, GOALS['ours_vs_diffusers'], True)})")
    else:
        print("  (b) ours / diffusers per pair: n/a")
    if "ours_dpo_k2_cached" in med and "diffusers_dpo" in med:
        speed = med["diffusers_dpo"] / med["ours_dpo_k2_cached"]
        print(f"  (c) speed-up, cached ours vs diffusers: {speed:.2f}x  (goal >= {GOALS['cached_speedup']:.2f}x: "
              f"{verdict(speed, GOALS['cached_speedup'], False)})")
    else:
        print("  (c) speed-up, cached ours vs diffusers: n/a")
    if "ours_dpo_k2_cached" in med and "ours_dpo_k2" in med:
        print(f"      cached vs uncached ours: {med['ours_dpo_k2'] / med['ours_dpo_k2_cached']:.2f}x")
    if "ours_rankdpo_k4" in med and "ours_dpo_k2" in med:
        ratio = med["ours_rankdpo_k4"] / med["ours_dpo_k2"]
        print(f"  (d) rankdpo k=4 / dpo k=2, time per prompt: {ratio:.2f}x  (goal <= {GOALS['rankdpo_k4_vs_dpo']:.2f}x: "
              f"{verdict(ratio, GOALS['rankdpo_k4_vs_dpo'], True)}); peak RSS "
              f"{results['ours_rankdpo_k4']['peak_rss_mib']:.0f} vs {results['ours_dpo_k2']['peak_rss_mib']:.0f} MiB")
    else:
        print("  (d) rankdpo k=4 / dpo per prompt: n/a")
    for n in notes:
        print(f"  note: {n}")
    (work / "bench_trainer.json").write_text(json.dumps({"args": vars(args), "results": results, "runs": runs}, indent=2))
    print(f"\nresults: {work / 'bench_trainer.json'}  (total {time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
