"""Full-size cost of the paper's recipe: sizes and FLOPs of every model, and a FLOP-based GPU-hour projection.

The models are those of ``jobs/syn_pic.yaml`` (four generators, five rewards) and of
``jobs/syn_pic_train_{sdxl,sd3}.yaml`` (RankDPO), each at its released architecture with random weights
(``bench/full_size_models.py``), built on PyTorch's ``meta`` device: nothing is allocated or computed, so
this runs in a minute or two on any CPU.

* **Sizes**: parameters per loaded model and the weights' memory in the job's dtype (what ``model_copies``
  planning needs; activations come on top: ``bench/gpu_cost.py`` measures peak memory on a GPU).
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one call of each stage at the job's shapes
  (1024 px; CFG rows included), times the calls per image the job makes (steps; text encoders and decoders
  once). Training: one image of a RankDPO step = VAE encode + reference forward + policy forward and
  backward with gradient checkpointing (recomputation counted), weights frozen as under LoRA.
* **Projection** (not a measurement): FLOPs / (A100 bf16 peak 312 TFLOP/s x model-FLOPs utilisation) for
  58K prompts x 4 generators, 232K images x 5 rewards, and 400 steps x 1024 prompts x 4 images per trained
  model; dollars at ``--usd-per-gpu-hour``. Compared with the paper's (arXiv 2410.18013) 10 A100 GPU-days and
  about $186 + $20 for the dataset, and 8 A100 x 16 h per trained model.

Usage::

    flock /work/wt/bench.lock python bench/bench_full_size.py [--mfu 0.25,0.40] [--json out.json]
    python bench/bench_full_size.py --sizes-only                       # instant
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import full_size_models as fsm  # noqa: E402

A100_BF16_PEAK = 312e12  # dense bf16/fp16 tensor-core FLOP/s (NVIDIA A100 datasheet)
# float32 as PyTorch runs it by default: matmuls in true fp32 (torch.backends.cuda.matmul.allow_tf32 is
# False), 19.5 TFLOP/s; the four rewards jobs/syn_pic.yaml leaves at their default dtype run so.
A100_PEAK = {"float16": A100_BF16_PEAK, "bfloat16": A100_BF16_PEAK, "float32": 19.5e12}
PAPER = {"dataset_gpu_hours": 240.0, "dataset_usd": 186.0 + 20.0, "train_gpu_hours": 8 * 16.0}
# The paper's own price per A100-hour: its $206 over its 240 A100-hours, so dollars compare like for like.
PAPER_USD_PER_GPU_HOUR = PAPER["dataset_usd"] / PAPER["dataset_gpu_hours"]


def model_sizes() -> list[dict]:
    """One row per distinct component of each loaded generator or reward (training reuses the generators)."""
    rows, seen = [], set()
    for stage in fsm.GENERATION + fsm.REWARDS:
        key = (stage.model, stage.name.replace(" decode", "").replace(" encode", ""))
        if key in seen:
            continue
        seen.add(key)
        n = fsm.count_params(stage)
        rows.append({"model": stage.model, "component": stage.name, "params": n, "published": stage.published,
                     "dtype": stage.dtype, "weights_gib": n * fsm.BYTES[stage.dtype] / 2**30})
    return rows


def model_totals(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        t = out.setdefault(r["model"], {"params": 0, "weights_gib": 0.0, "dtype": r["dtype"]})
        t["params"] += r["params"]
        t["weights_gib"] += r["weights_gib"]
    return out


def stage_flops() -> list[dict]:
    rows = []
    for stage in fsm.ALL_STAGES:
        per_call = fsm.count_flops(stage, batch=1)
        rows.append({"model": stage.model, "stage": stage.name, "dtype": stage.dtype, "flops_per_call": per_call,
                     "calls": stage.calls, "cfg": stage.cfg, "train": stage.train,
                     "flops_per_image": per_call * stage.calls, "note": stage.note})
        print(f"  {stage.model:<17} {stage.name:<42} {per_call / 1e12:8.3f} TFLOP x {stage.calls:g}"
              f"{' (CFG rows incl.)' if stage.cfg else ''}", flush=True)
    return rows


def projection(rows: list[dict], mfus: list[float], usd: float, prompts: int) -> dict:
    """A100-hours = sum over stages of FLOPs per image x images / (the A100's peak in the stage's dtype x MFU)."""
    models: dict[str, dict] = {}
    for r in rows:
        images = fsm.images_per_model(r["model"], prompts)
        m = models.setdefault(r["model"], {"flops_per_image": 0.0, "images": images, "flops_total": 0.0,
                                           "peak_seconds": 0.0, "peak_seconds_half": 0.0})
        m["flops_per_image"] += r["flops_per_image"]
        m["flops_total"] += r["flops_per_image"] * images
        m["peak_seconds"] += r["flops_per_image"] * images / A100_PEAK[r["dtype"]]
        m["peak_seconds_half"] += r["flops_per_image"] * images / A100_BF16_PEAK
    for m in models.values():
        m["a100_hours"] = {f"{u:.2f}": m["peak_seconds"] / u / 3600 for u in mfus}
    groups = {"generation": [m for m in models if any(s.model == m for s in fsm.GENERATION)],
              "labelling": [m for m in models if any(s.model == m for s in fsm.REWARDS)]}
    groups["dataset"] = groups["generation"] + groups["labelling"]
    summary = {}
    for group, names in groups.items():
        seconds = sum(models[m]["peak_seconds"] for m in names)
        hours = {f"{u:.2f}": seconds / u / 3600 for u in mfus}
        summary[group] = {"flops_total": sum(models[m]["flops_total"] for m in names), "a100_hours": hours,
                          "usd": {k: h * usd for k, h in hours.items()}}
    half = sum(models[m]["peak_seconds_half"] for m in groups["labelling"])
    summary["labelling_half_precision"] = {"a100_hours": {f"{u:.2f}": half / u / 3600 for u in mfus}}
    return {"models": models, "summary": summary, "mfu": mfus, "usd_per_gpu_hour": usd, "prompts": prompts,
            "a100_peak_flops": A100_BF16_PEAK, "paper": PAPER}


def print_sizes(rows: list[dict]) -> None:
    print(f"{'model':<16} {'component':<30} {'params':>9} {'published':>9} {'dtype':>8} {'weights':>9}")
    for r in rows:
        print(f"{r['model']:<16} {r['component']:<30} {r['params'] / 1e9:>8.3f}B {r['published']:>9} "
              f"{r['dtype']:>8} {r['weights_gib']:>6.2f}GiB")
    for model, t in model_totals(rows).items():
        print(f"{model:<16} {'TOTAL (one loaded copy)':<30} {t['params'] / 1e9:>8.3f}B {'':>9} {t['dtype']:>8} "
              f"{t['weights_gib']:>6.2f}GiB")


def print_projection(p: dict) -> None:
    keys = list(next(iter(p["models"].values()))["a100_hours"])
    head = "  ".join(f"{'MFU ' + k:>10}" for k in keys)
    print(f"\nFLOP-based projection (NOT a measurement): A100 peak (bf16/fp16 {p['a100_peak_flops'] / 1e12:.0f}, "
          f"fp32 19.5 TFLOP/s, each stage at its job dtype) x MFU; {p['prompts']:,} prompts")
    print(f"{'model':<17} {'TFLOP/image':>11} {'images':>10} {'EFLOP':>7}  A100-hours at {head}")
    for model, m in p["models"].items():
        hours = "  ".join(f"{h:>10,.0f}" for h in m["a100_hours"].values())
        print(f"{model:<17} {m['flops_per_image'] / 1e12:>11.1f} {m['images']:>10,} {m['flops_total'] / 1e18:>7.1f}"
              f"  {'':>13} {hours}")
    usd = p["usd_per_gpu_hour"]
    for group in ("generation", "labelling", "dataset"):
        s = p["summary"][group]
        hours = ", ".join(f"{h:,.0f} h / {h / 24:.1f} days / ${s['usd'][k]:,.0f} at MFU {k}"
                          for k, h in s["a100_hours"].items())
        print(f"{group:<11}: {s['flops_total'] / 1e18:.1f} EFLOP -> {hours}")
    half_hours = p["summary"]["labelling_half_precision"]["a100_hours"]
    half = ", ".join(f"{h:,.1f} h at MFU {k}" for k, h in half_hours.items())
    print(f"(labelling runs HPSv2.1, MPS, PickScore and ImageReward in float32, the job's default: at the A100's "
          f"fp32 peak of 19.5 TFLOP/s. With every reward in bf16/fp16 it would take {half}.)")
    paper = p["paper"]
    print(f"paper     : dataset {paper['dataset_gpu_hours']:.0f} A100-hours (10 GPU-days), about "
          f"${paper['dataset_usd']:.0f} ($186 generation + <$20 labelling); training 8 A100 x 16 h = "
          f"{paper['train_gpu_hours']:.0f} A100-hours per model. Dollars above at ${usd:.2f}/A100-hour.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfu", default="0.25,0.40",
                        help="model-FLOPs utilisations to project at (fractions of the A100's 312 TFLOP/s)")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=PAPER_USD_PER_GPU_HOUR,
                        help="price of one A100-hour (default: the paper's own $206 / 240 h)")
    parser.add_argument("--prompts", type=int, default=fsm.PAPER_PROMPTS, help="prompts in the dataset projection")
    parser.add_argument("--sizes-only", action="store_true", help="parameter counts and weight memory only")
    parser.add_argument("--json", default="", help="also write every figure here (strict JSON)")
    args = parser.parse_args(argv)
    try:
        mfus = [float(x) for x in args.mfu.split(",") if x.strip()]
    except ValueError:
        mfus = []
    if not mfus or not all(0 < m <= 1 for m in mfus) or args.usd_per_gpu_hour < 0 or args.prompts < 1:
        print("bench_full_size: --mfu takes fractions in (0, 1] separated by commas; --usd-per-gpu-hour >= 0; "
              "--prompts >= 1", file=sys.stderr)
        return 2

    with fsm.quiet():
        sizes = model_sizes()
        print_sizes(sizes)
        result = {"sizes": sizes, "totals": model_totals(sizes)}
        if not args.sizes_only:
            print("\nFLOPs per call at the jobs' shapes (FlopCounterMode on the meta device):")
            flops = stage_flops()
            result["stages"] = flops
            result["projection"] = projection(flops, mfus, args.usd_per_gpu_hour, args.prompts)
            print_projection(result["projection"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
