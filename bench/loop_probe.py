"""Does training on a reward's labels move the tiny demo model in that reward's direction? (a probe, not a test)

Protocol: two builds that differ only in their one reward, ``jpeg_compressibility`` or its exact negative
``jpeg_incompressibility`` (same prompts, seeds and candidates, so the two label sets are mirror images), on
the tiny demo SD model; each is trained with the same settings; then both tuned models (and the base)
generate on the builtin prompts the builds did not use, with shared seeds, and every image is scored by
``jpeg_compressibility``. For each (prompt, seed) the model trained on the compressibility labels wins when its
image is more compressible than the other model's; a two-sided sign test (binomial, ties left out) says
whether the wins are more than noise. Training alone moves images too, in a direction that does not depend on
the labels: comparing the two tuned models with each other, not with the base, cancels it.

    .venv/bin/python bench/loop_probe.py --workdir out/loop_probe --rewards brightness,darkness \
        --settings full:learning_rate=1e-4:max_steps=60,lora:learning_rate=1e-3:max_steps=60 --train-seeds 0,1,2

``--model random`` uses the random demo pipeline instead of the briefly trained one (``demo/tiny_trained.py``);
a setting is a named one or ``finetune:key=value:...`` (TrainConfig fields).

Builds are cached in ``--workdir`` (one per reward); each setting trains twice. Prints one line per setting
(win rate, p, mean score difference, seconds) and writes ``--json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REWARDS = ["jpeg_compressibility", "jpeg_incompressibility"]  # --rewards replaces them
# name -> TrainConfig fields (on top of BASE_TRAIN)
SETTINGS = {
    "lora-1e-4-20": dict(finetune="lora", learning_rate=1e-4, max_steps=20),  # the demo's defaults
    "lora-1e-3-60": dict(finetune="lora", learning_rate=1e-3, max_steps=60),
    "lora-1e-2-60": dict(finetune="lora", learning_rate=1e-2, max_steps=60),
    "lora-1e-3-60-r16": dict(finetune="lora", learning_rate=1e-3, max_steps=60, lora_rank=16),
    "lora-1e-3-60-beta250": dict(finetune="lora", learning_rate=1e-3, max_steps=60, beta=250.0),
    "full-1e-5-60": dict(finetune="full", learning_rate=1e-5, max_steps=60),
    "full-1e-4-60": dict(finetune="full", learning_rate=1e-4, max_steps=60),
    "full-1e-3-60": dict(finetune="full", learning_rate=1e-3, max_steps=60),
    "full-1e-4-60-beta250": dict(finetune="full", learning_rate=1e-4, max_steps=60, beta=250.0),
    "full-1e-4-60-beta25": dict(finetune="full", learning_rate=1e-4, max_steps=60, beta=25.0),
    "lora-1e-2-60-beta25": dict(finetune="lora", learning_rate=1e-2, max_steps=60, beta=25.0),
    "full-1e-3-60-beta25": dict(finetune="full", learning_rate=1e-3, max_steps=60, beta=25.0),
    "full-1e-4-120-beta25": dict(finetune="full", learning_rate=1e-4, max_steps=120, beta=25.0),
}


def parse_setting(name: str) -> dict:
    """A named setting, or ``finetune:key=value:...`` (e.g. ``full:learning_rate=3e-5:max_steps=200``)."""
    if name in SETTINGS:
        return SETTINGS[name]
    finetune, *pairs = name.split(":")
    setting = {"finetune": finetune}
    for pair in pairs:
        key, value = pair.split("=", 1)
        setting[key] = json.loads(value) if not value.replace(".", "").isalpha() else value
    return setting
BASE_TRAIN = dict(resolution=64, batch_size=4, seed=0, torch_threads=1, loss="rankdpo")
GEN = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64)


def build_dataset(workdir: Path, models: dict, reward: str, train_prompts: int, candidates: int) -> Path:
    """One build over the tiny demo model with ``reward`` alone; cached (the build's own up-to-date check)."""
    from synpref.pipelines.build_preferences import build
    from synpref.schemas.config import build_config_from_dict

    out = workdir / f"build-{reward}-{Path(models['tiny-sd-a']).name}"
    cfg = {"seed": 0, "candidates_per_generator": candidates,
           "prompts": {"source": "builtin", "num_prompts": train_prompts},
           "generators": [dict(id="tiny-sd-a", model=models["tiny-sd-a"], **GEN)],
           "rewards": [{"name": reward}],
           "output": {"output_dir": str(out), "samples_per_shard": 16}}
    result = build(build_config_from_dict(cfg))
    if result["summary"]["problems"]:
        raise SystemExit(f"build {reward} failed: {result['summary']['problems']}")
    return out


def held_out_prompts(build_dir: Path, limit: int) -> list[str]:
    """Builtin prompts the build did not train on (read from its ranked shards)."""
    import tarfile

    seen = set()
    for tar_path in sorted((build_dir / "ranked").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    seen.add(json.loads(tar.extractfile(m).read())["prompt"])
    builtin = Path(__file__).resolve().parents[1] / "jobs" / "builtin_prompts.jsonl"
    prompts = [json.loads(line)["prompt"] for line in builtin.read_text().splitlines() if line.strip()]
    return [p for p in prompts if p not in seen][:limit]


def train_one(workdir: Path, models: dict, build_dir: Path, name: str, setting: dict, seed: int) -> tuple[Path, float]:
    """Train (or reuse a finished run of the same config in the same folder); return the folder and seconds."""
    from synpref.training.config import TrainConfig
    from synpref.training.train import train

    reward = build_dir.name.removeprefix("build-")
    out = workdir / f"train-{name}-s{seed}-{reward}"
    cfg = TrainConfig(pretrained_model=models["tiny-sd-a"], shards=[str(build_dir / "ranked")], output_dir=str(out),
                      **{**BASE_TRAIN, **setting, "seed": seed})
    done = out / "train_summary.json"
    same = lambda c: {k: v for k, v in c.items() if k != "data_format"}  # noqa: E731 (auto is saved resolved)
    if done.is_file() and same(json.loads(done.read_text())["config"]) == same(json.loads(json.dumps(cfg.to_dict()))):
        return out, json.loads(done.read_text())["seconds"]
    start = time.perf_counter()
    train(cfg)
    return out, time.perf_counter() - start


def generate_and_score(model_dir: str, tuned: Path | None, prompts: list[str], seeds: int) -> list[float]:
    """jpeg_compressibility of one image per (prompt, seed), seeds shared by every model."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from synpref.transforms.rewards import create_reward

    kwargs = {}
    if tuned is not None and (tuned / "unet").is_dir():
        kwargs["unet"] = UNet2DConditionModel.from_pretrained(str(tuned / "unet"))
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                   **kwargs)
    if tuned is not None and not (tuned / "unet").is_dir():
        pipe.load_lora_weights(str(tuned))
    pipe.set_progress_bar_config(disable=True)
    reward = create_reward(REWARDS[0], {})
    reward.load()
    scores = []
    for prompt in prompts:
        for s in range(seeds):
            seed = int.from_bytes(hashlib.sha256(f"{prompt}:{s}".encode()).digest()[:4], "big")
            image = pipe(prompt, generator=torch.Generator().manual_seed(seed), **GEN).images[0]
            scores.append(reward.score_batch([image], [prompt])[0])
    return scores


def sign_test(a: list[float], b: list[float]) -> dict:
    """Paired: a wins where a > b. Two-sided binomial p over the non-tied pairs."""
    from scipy.stats import binomtest

    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    n = wins + losses
    return {"wins": wins, "losses": losses, "ties": len(a) - n, "win_rate": wins / n if n else float("nan"),
            "p": binomtest(wins, n, 0.5).pvalue if n else 1.0,
            "mean_diff": sum(x - y for x, y in zip(a, b)) / len(a)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="out/loop_probe")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {list(SETTINGS)}")
    parser.add_argument("--train-prompts", type=int, default=32)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--train-seeds", default="0", help="comma-separated training seeds; each trains both models")
    parser.add_argument("--rewards", default="jpeg_compressibility,jpeg_incompressibility", help="a reward and its exact negative")
    parser.add_argument("--model", choices=["trained", "random"], default="trained",
                        help="the tiny SD pipeline trained for a minute (demo/tiny_trained.py) or the random demo one")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    REWARDS[:] = args.rewards.split(",")

    import torch

    from synpref.demo.tiny_models import save_demo_models

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(1)
    workdir = Path(args.workdir)
    models = save_demo_models(workdir / "models")
    if args.model == "trained":  # the builds, training and evaluation all use the key "tiny-sd-a"
        from synpref.demo.tiny_trained import save_trained_tiny_sd

        trained = workdir / "models" / "tiny-trained"
        if not (trained / "synpref_pretraining.json").is_file():
            save_trained_tiny_sd(trained, seed=0)
        models = {**models, "tiny-sd-a": str(trained)}
    start = time.perf_counter()
    builds = {r: build_dataset(workdir, models, r, args.train_prompts, args.candidates) for r in REWARDS}
    build_seconds = time.perf_counter() - start
    prompts = held_out_prompts(builds[REWARDS[0]], args.eval_prompts)
    base = generate_and_score(models["tiny-sd-a"], None, prompts, args.seeds)
    print(f"builds {build_seconds:.0f}s; {len(prompts)} held-out prompts x {args.seeds} seeds; "
          f"base {REWARDS[0]} mean {sum(base) / len(base):.3f}", flush=True)
    results = {}
    for name in args.settings.split(","):
        per_seed, pooled = [], {r: [] for r in REWARDS}
        for seed in [int(x) for x in args.train_seeds.split(",")]:
            seconds, scores = {}, {}
            for reward in REWARDS:
                out, seconds[reward] = train_one(workdir, models, builds[reward], name.replace(':', '_'), parse_setting(name), seed)
                scores[reward] = generate_and_score(models["tiny-sd-a"], out, prompts, args.seeds)
                pooled[reward] += scores[reward]
            comp, incomp = scores[REWARDS[0]], scores[REWARDS[1]]
            row = {"seed": seed, "train_seconds": seconds, "comp_vs_incomp": sign_test(comp, incomp),
                   "comp_vs_base": sign_test(comp, base), "incomp_vs_base": sign_test(incomp, base)}
            per_seed.append(row)
            r = row["comp_vs_incomp"]
            print(f"{name:<22} seed {seed}: {REWARDS[0]}-trained beats {REWARDS[1]}-trained on {REWARDS[0]} "
                  f"{r['wins']}/{r['wins'] + r['losses']} (win rate {r['win_rate']:.2f}, p {r['p']:.3g}, mean diff "
                  f"{r['mean_diff']:+.4f}); vs base: {REWARDS[0]}-trained {row['comp_vs_base']['win_rate']:.2f}, other "
                  f"{row['incomp_vs_base']['win_rate']:.2f}; train {seconds[REWARDS[0]]:.0f}s + "
                  f"{seconds[REWARDS[1]]:.0f}s", flush=True)
        total = sign_test(pooled[REWARDS[0]], pooled[REWARDS[1]])
        results[name] = {"setting": parse_setting(name), "per_seed": per_seed, "pooled_comp_vs_incomp": total}
        if len(per_seed) > 1:  # the direction must hold across training seeds, not only within one pair of models
            right = sum(s["comp_vs_incomp"]["win_rate"] > 0.5 for s in per_seed)
            print(f"{name:<22} pooled over {len(per_seed)} training seeds: win rate {total['win_rate']:.2f} "
                  f"(p {total['p']:.3g}); right direction in {right}/{len(per_seed)} seeds", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"builds_seconds": build_seconds, "prompts": len(prompts),
                                               "seeds": args.seeds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
