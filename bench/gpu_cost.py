"""Time the paper's models at full size on a GPU and project the recipe's GPU-hours from the measurement.

Every stage of ``bench/full_size_models.py`` (the four generators' text encoders, denoisers and decoders,
the five rewards, one image of a RankDPO step for SDXL and SD3-Medium) is built at its released
architecture with random weights (initialised on the device: no download, seconds per model) in the
job's dtype, warmed up once, and timed over ``--iters`` calls per batch size (CUDA-synchronised). Printed
per model: seconds and images per second, peak GPU memory, achieved TFLOP/s against the FLOPs that
``FlopCounterMode`` counts for the same call (so the MFU assumption of ``bench/bench_full_size.py`` can be
checked), and the GPU-hours of jobs/syn_pic.yaml (58K prompts x 4 generators, 232K images x 5 rewards)
and of each training job (400 steps x 1024 prompts x 4 images) on this GPU.

One prepared run (``bench/gpu_cost.sh`` carries the two packages a bare GPU machine lacks)::

    python bench/gpu_cost.py --device cuda --batch 1,4 --json gpu_cost.json   # not yet run on a GPU
    python bench/gpu_cost.py --dry-run          # every stage on the meta device: builds, shapes, dtypes, report
    python bench/gpu_cost.py --device cpu --only image_reward --iters 1      # a real (slow) run on a CPU

``--budget-s`` stops timing new stages once spent (the stages not timed are listed), so a run fits a lease.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import full_size_models as fsm  # noqa: E402

# Dense tensor-core peaks (datasheets, SXM parts): half precision, and float32 as PyTorch runs it by default
# (matmuls in true fp32: torch.backends.cuda.matmul.allow_tf32 is False unless a script turns it on).
PEAKS = {"A100": {"half": 312e12, "float32": 19.5e12}, "H100": {"half": 989e12, "float32": 67e12},
         "H200": {"half": 989e12, "float32": 67e12}}


def device_peak(device: str, dtype: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks["float32" if dtype == "float32" else "half"]
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_stage(stage: fsm.Stage, net, batch: int, iters: int, device: str) -> dict:
    closure = fsm.forward_closure(stage, net, batch, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    closure()  # warm-up: kernels chosen, memory pools grown
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        closure()
    _sync(device)
    seconds = (time.perf_counter() - start) / iters
    row = {"batch": batch, "seconds_per_call": seconds, "seconds_per_image": seconds / batch * stage.calls}
    if device.startswith("cuda"):
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def select(only: str) -> list[fsm.Stage] | None:
    """The stages of the named models (all when none); None when a name is unknown (reported)."""
    names = [n for n in only.split(",") if n]
    known = sorted({s.model for s in fsm.ALL_STAGES})
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"gpu_cost: unknown model(s) {unknown} in --only; one of {known}", file=sys.stderr)
        return None
    return [s for s in fsm.ALL_STAGES if not names or s.model in names]


def run(stages: list[fsm.Stage], device: str, batches: list[int], iters: int, budget_s: float) -> dict:
    started, rows, skipped = time.perf_counter(), [], []
    cache: dict = {}  # one module per (architecture, training mode) within a model: the reference forward
    current = None  # reuses the policy's weights
    for stage in stages:
        if stage.model != current:
            cache.clear()
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            current = stage.model
        if time.perf_counter() - started > budget_s:
            skipped.append(f"{stage.model}/{stage.name}")
            continue
        key = (stage.build, stage.dtype, stage.train)
        t0 = time.perf_counter()
        try:
            if key not in cache:
                cache[key] = fsm.build(stage, device)
            net = cache[key]
            built = time.perf_counter() - t0
            try:
                flops = fsm.count_flops(stage, batch=1)
            except Exception as e:  # a FLOP count failing must not cost the timing: reported as 0 FLOPs
                flops = 0
                print(f"{stage.model:<17} {stage.name:<40} FLOP count failed ({type(e).__name__}: {e})"[:300],
                      flush=True)
            for batch in batches:
                try:
                    row = time_stage(stage, net, batch, iters, device)
                except torch.cuda.OutOfMemoryError:
                    row = {"batch": batch, "error": "out of GPU memory"}
                    torch.cuda.empty_cache()
                row.update(model=stage.model, stage=stage.name, dtype=stage.dtype, calls=stage.calls,
                           flops_per_call=flops, build_s=built)
                if "seconds_per_call" in row:
                    row["tflops_per_s"] = flops * batch / row["seconds_per_call"] / 1e12
                    peak = device_peak(device, stage.dtype)
                    row["device_peak_flops"] = peak
                    row["mfu"] = row["tflops_per_s"] * 1e12 / peak if peak else None
                rows.append(row)
                print(_line(row), flush=True)
        except Exception as e:  # one stage failing must not cost the rest of the lease
            rows.append({"model": stage.model, "stage": stage.name, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{stage.model:<17} {stage.name:<40} FAILED {rows[-1]['error']}", flush=True)
    return {"rows": rows, "skipped": skipped, "seconds": time.perf_counter() - started}


def _line(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:<17} {r['stage']:<40} b{r['batch']:<2} {r['error']}"
    mem = f" peak {r['peak_memory_gib']:6.1f} GiB" if "peak_memory_gib" in r else ""
    mfu = f" MFU {r['mfu']:.0%}" if r.get("mfu") is not None else ""
    return (f"{r['model']:<17} {r['stage']:<40} b{r['batch']:<2} {r['seconds_per_call'] * 1e3:9.1f} ms/call "
            f"{r['tflops_per_s']:7.2f} TFLOP/s{mfu}{mem} (built in {r['build_s']:.0f} s)")


def summarise(result: dict, device: str, prompts: int) -> dict:
    """Per model: the best batch's seconds per image over its stages, images/s, and the job's GPU-hours."""
    best: dict[tuple, dict] = {}
    for r in result["rows"]:
        if "seconds_per_image" not in r:
            continue
        key = (r["model"], r["stage"])
        if key not in best or r["seconds_per_image"] < best[key]["seconds_per_image"]:
            best[key] = r
    models: dict[str, dict] = {}
    failed = {r["model"] for r in result["rows"] if "seconds_per_image" not in r}
    failed |= {s.split("/")[0] for s in result["skipped"]}
    for (model, _), r in best.items():
        m = models.setdefault(model, {"seconds_per_image": 0.0, "flops_per_image": 0.0, "a100_seconds_per_image": 0.0})
        m["seconds_per_image"] += r["seconds_per_image"]
        m["flops_per_image"] += r["flops_per_call"] * r["calls"]
        # the same stage on an A100 at the MFU measured here: time x (this GPU's peak / the A100's), per dtype
        a100 = PEAKS["A100"]["float32" if r["dtype"] == "float32" else "half"]
        if r.get("device_peak_flops") and m["a100_seconds_per_image"] is not None:
            m["a100_seconds_per_image"] += r["seconds_per_image"] * r["device_peak_flops"] / a100
        else:
            m["a100_seconds_per_image"] = None
    for model, m in models.items():
        m["complete"] = model not in failed
        m["images_per_s"] = 1.0 / m["seconds_per_image"]
        m["tflops_per_s"] = m["flops_per_image"] / m["seconds_per_image"] / 1e12
        m["images"] = fsm.images_per_model(model, prompts)
        m["gpu_hours"] = m["seconds_per_image"] * m["images"] / 3600
        a100 = m.pop("a100_seconds_per_image")
        m["a100_hours_at_same_mfu"] = a100 * m["images"] / 3600 if a100 is not None else None
    groups = {"generation": {s.model for s in fsm.GENERATION}, "labelling": {s.model for s in fsm.REWARDS}}
    totals = {g: sum(models[m]["gpu_hours"] for m in names if m in models) for g, names in groups.items()}
    known = all(m["a100_hours_at_same_mfu"] is not None for m in models.values())
    a100_totals = {g: sum(models[m]["a100_hours_at_same_mfu"] for m in names if m in models) if known else None
                   for g, names in groups.items()}
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    return {"device": gpu, "models": models, "gpu_hours": totals, "a100_hours_at_same_mfu": a100_totals,
            "complete": all(m in models and models[m]["complete"] for names in groups.values() for m in names)}


def print_summary(s: dict, dry_run: bool) -> None:
    print(f"\nMeasured on {s['device']}{' (DRY RUN: meta tensors, the times mean nothing)' if dry_run else ''}:")
    print(f"{'model':<17} {'s/image':>9} {'images/s':>9} {'TFLOP/s':>8} {'images':>10} {'GPU-hours':>10}")
    for model, m in s["models"].items():
        flag = "" if m["complete"] else "  (some stages not timed)"
        print(f"{model:<17} {m['seconds_per_image']:>9.3f} {m['images_per_s']:>9.2f} {m['tflops_per_s']:>8.1f} "
              f"{m['images']:>10,} {m['gpu_hours']:>10,.1f}{flag}")
    gen, lab = s["gpu_hours"]["generation"], s["gpu_hours"]["labelling"]
    print(f"jobs/syn_pic.yaml on this device: generation {gen:,.0f} h + labelling {lab:,.0f} h = {gen + lab:,.0f} "
          f"GPU-hours ({(gen + lab) / 24:.1f} GPU-days){'' if s['complete'] else ' (INCOMPLETE: see above)'}; "
          "the paper: 10 A100 GPU-days. Training: the train_* rows, per model (the paper: 8 A100 x 16 h = 128 h).")
    a100 = s["a100_hours_at_same_mfu"]
    if a100["generation"] is not None:
        train = ", ".join(f"{m} {v['a100_hours_at_same_mfu']:,.0f} h" for m, v in s["models"].items()
                          if m.startswith("train_"))
        print(f"On an A100 at the MFU measured here (a projection: an A100 usually reaches a higher MFU than an "
              f"H100 on the same code): dataset {a100['generation'] + a100['labelling']:,.0f} A100-hours "
              f"({(a100['generation'] + a100['labelling']) / 24:.1f} days){'; training ' + train if train else ''}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, cpu or meta")
    parser.add_argument("--batch", default="1,4", help="images per call to time, comma-separated (CFG doubles rows)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls per stage and batch, after one warm-up")
    parser.add_argument("--only", default="", help="models to time, comma-separated (default all)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new stage after this many seconds")
    parser.add_argument("--prompts", type=int, default=fsm.PAPER_PROMPTS)
    parser.add_argument("--dry-run", action="store_true", help="meta device, batch 1, one call: checks the script")
    parser.add_argument("--json", default="", help="also write every figure here (strict JSON)")
    args = parser.parse_args(argv)
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or args.iters < 1:
        print("gpu_cost: --batch takes positive integers separated by commas; --iters >= 1", file=sys.stderr)
        return 2
    device = "meta" if args.dry_run else args.device
    if args.dry_run:
        batches, args.iters = [1], 1
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_cost: --device cuda but no CUDA device is visible (use --dry-run to check the script)",
              file=sys.stderr)
        return 2
    stages = select(args.only)
    if stages is None:
        return 2
    print(f"torch {torch.__version__}, device {device}, batches {batches}, {args.iters} timed calls per stage",
          flush=True)
    with fsm.quiet():
        result = run(stages, device, batches, args.iters, args.budget_s)
    summary = summarise(result, device, args.prompts)
    print_summary(summary, args.dry_run)
    if result["skipped"]:
        print(f"not timed (budget {args.budget_s:.0f} s spent): {', '.join(result['skipped'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, **result, "dry_run": args.dry_run}, f, indent=2, allow_nan=False)
    errors = [r for r in result["rows"] if "error" in r and r["error"] != "out of GPU memory"]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
