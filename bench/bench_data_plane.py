"""The build's data plane at real image sizes, against a plain loop measured in the same run, plus peak memory.

    python bench/bench_data_plane.py [--sizes 128,256,512] [--prompts 64]
                                     [--mem-prompts 32] [--mem-sizes 256,512] [--skip-memory]
                                     [--skip-throughput] [--workdir DIR] [--beam-args "--direct_num_workers=1"]

About 3.5 minutes at the defaults on 2 CPU cores. Exit status 1 if any build failed.

No diffusion model: the build runs the model-free ``procedural`` generator
(``transforms/generators/procedural.py``, ~6 ms per 512 px image), so what is
measured is the data plane: staging, scoring, ranking, filtering, shard writing
and the memory they hold. Each build: 1 generator x 4 candidates per prompt, one
cheap reward (``sharpness``), 64 samples per shard, DirectRunner, torch_threads 1.
Prompts are N distinct generated lines in a .txt file (the builtin set has only 64).

Throughput (per image size): the build (wall time of ``build()``, after one tiny
warm-up build in the same process so one-time imports are not counted) against
a plain Python loop over the same prompts in the same process: the same
generator and seeds (``derive_seed``), PNG encoding with the staging settings,
the same reward, Syn-Pic labels, and the same ranked and pair tar shards written
with ``webdataset.TarWriter`` (no staging files, Parquet indexes, manifest or
dead letters). The ranked shards' PNG bytes of the two are compared ("same
images"). Machines are noisy: only same-run ratios mean anything.

Peak memory: each build runs alone in a fresh subprocess (``--child``) at 1x and
4x ``--mem-prompts`` prompts. The child imports everything first (Beam, torch,
synpref), resets its peak RSS (Linux ``/proc/self/clear_refs``; import-time peaks
are not the data plane), runs the build (the DirectRunner runs it in-process)
and prints its peak RSS at exit: the resident memory at the build's high-water
mark (VmHWM from /proc; ``ru_maxrss`` beside it, equal where nothing interferes). "build adds" = that peak minus the RSS
just before the build. Memory runs go first, while this process is still small:
Linux carries a parent's RSS at fork into the child's ``ru_maxrss``. The team's
goal is peak(4x) / peak(1x) <= 1.1: memory that does not grow with the dataset.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

import numpy as np

K = 4  # candidates per prompt
SAMPLES_PER_SHARD = 64
GENERATOR_ID = "proc"
MEM_GOAL = 1.1

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "golden"]
_THINGS = ["cat", "teapot", "bicycle", "lighthouse", "robot", "violin", "cactus", "sailboat", "owl", "clock",
           "castle", "umbrella"]
_PLACES = ["on a beach", "in a forest", "on the moon", "in a kitchen", "under water", "in a desert",
           "on a rooftop", "in the snow"]


def write_prompt_file(path: str, n: int) -> str:
    """``n`` distinct prompts, one per line (the index makes every line unique)."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(f"a {_COLOURS[i % len(_COLOURS)]} {_THINGS[(i // 3) % len(_THINGS)]} "
                    f"{_PLACES[(i // 7) % len(_PLACES)]}, study number {i}\n")
    return path


def config_dict(prompt_file: str, size: int, output_dir: str) -> dict:
    return {
        "seed": 0,
        "candidates_per_generator": K,
        "torch_threads": 1,
        "prompts": {"source": prompt_file, "num_prompts": None},
        "generators": [{"id": GENERATOR_ID, "type": "procedural", "model": "synpref/procedural",
                        "height": size, "width": size}],
        "rewards": [{"name": "sharpness"}],
        "output": {"output_dir": output_dir, "samples_per_shard": SAMPLES_PER_SHARD},
    }


def make_config(prompt_file: str, size: int, output_dir: str):
    from synpref.schemas.config import build_config_from_dict

    return build_config_from_dict(config_dict(prompt_file, size, output_dir))


def run_build(cfg, beam_args: list[str]) -> tuple[float, dict]:
    from synpref.pipelines.build_preferences import build

    start = time.perf_counter()
    result = build(cfg, list(beam_args))
    return time.perf_counter() - start, result


# --- the plain loop ---------------------------------------------------------------------------------------

def encode_png(pixels: np.ndarray) -> bytes:
    """The staging encoder's settings: PIL, no optimize, compress_level 6, no metadata."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def run_baseline(cfg, output_dir: str) -> tuple[float, dict]:
    """Same prompts, images, reward, labels and shards as the build, in a plain loop; returns (seconds, counts)."""
    import webdataset as wds
    from PIL import Image

    from synpref.transforms.aggregators import syn_pic_win_rate
    from synpref.transforms.generation import derive_seed
    from synpref.transforms.generators import create_generator
    from synpref.transforms.prompts import normalize_prompt, prompt_id_of
    from synpref.transforms.rewards import create_reward

    start = time.perf_counter()
    with open(cfg.prompts.source, encoding="utf-8") as f:
        texts = [normalize_prompt(line) for line in f if line.strip()]
    prompts = sorted({prompt_id_of(t): t for t in texts}.items())  # shard order: sorted prompt ids
    gcfg = cfg.generators[0]
    gen = create_generator(gcfg)
    gen.load()
    rewards = [create_reward(r.name, r.params) for r in cfg.rewards]
    for r in rewards:
        r.load()
    names = [r.name for r in cfg.rewards]
    per_shard = cfg.output.samples_per_shard
    os.makedirs(f"{output_dir}/ranked", exist_ok=True)
    os.makedirs(f"{output_dir}/pairs", exist_ok=True)
    counts = {"images": 0, "pairs": 0, "shards": 0}
    for first in range(0, len(prompts), per_shard):
        name = f"{first // per_shard:05d}"
        ranked_tar = wds.TarWriter(f"{output_dir}/ranked/ranked-{name}.tar", encoder=False, mtime=0.0)
        pairs_tar = wds.TarWriter(f"{output_dir}/pairs/pairs-{name}.tar", encoder=False, mtime=0.0)
        for pid, text in prompts[first:first + per_shard]:
            seeds = [derive_seed(cfg.seed, pid, gcfg.id, i) for i in range(cfg.candidates_per_generator)]
            images = gen.generate([text] * len(seeds), seeds)
            pixels = [(np.clip(im, 0.0, 1.0) * 255.0).round().astype(np.uint8) for im in images]
            pngs = [encode_png(p) for p in pixels]
            pil = [Image.fromarray(p) for p in pixels]
            table = np.array([[float(s) for s in r.score_batch(pil, [text] * len(pil))] for r in rewards]).T
            phi = syn_pic_win_rate(table)
            cids = [f"{pid}-{gcfg.id}-{i}" for i in range(len(seeds))]
            order = sorted(range(len(seeds)), key=lambda i: (-phi[i], cids[i]))
            labels = {i: {"candidate_id": cids[i], "rank": r + 1, "phi": float(phi[i]),
                          "scores": dict(zip(names, table[i].tolist())), "lineage": gen.lineage(seeds[i]).to_dict()}
                      for r, i in enumerate(order)}
            sample = {"__key__": pid, "json": _canonical_json({
                "prompt_id": pid, "prompt": text, "rewards": names,
                "candidates": [{**labels[i], "image": f"img{r}.png"} for r, i in enumerate(order)]})}
            for r, i in enumerate(order):
                sample[f"img{r}.png"] = pngs[i]
            ranked_tar.write(sample)
            counts["images"] += len(pngs)
            for a, w in enumerate(order):
                for lo in order[a + 1:]:
                    if phi[w] <= phi[lo]:
                        continue  # tied_phi
                    agreement = float((table[w] > table[lo]).mean())
                    if agreement - 0.5 <= cfg.filter.min_agreement_margin:
                        continue  # low_agreement
                    pairs_tar.write({"__key__": f"{cids[w]}__{cids[lo]}", "json": _canonical_json({
                        "prompt_id": pid, "prompt": text, "agreement": agreement, "rewards": names,
                        "winner": {**labels[w], "image": "win.png"}, "loser": {**labels[lo], "image": "lose.png"}}),
                        "win.png": pngs[w], "lose.png": pngs[lo]})
                    counts["pairs"] += 1
        ranked_tar.close()
        pairs_tar.close()
        counts["shards"] += 1
    return time.perf_counter() - start, counts


def png_digests(output_dir: str) -> list[str]:
    """sha256 of every PNG member of the ranked shards, sorted."""
    out = []
    for path in sorted(glob.glob(f"{output_dir}/ranked/*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".png"):
                    out.append(hashlib.sha256(tar.extractfile(m).read()).hexdigest())
    return sorted(out)


# --- memory: one build per fresh process ------------------------------------------------------------------

def _rss_mb() -> float:
    """Peak RSS of this process (ru_maxrss, KiB on Linux) in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _proc_status_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident peak) of this process from /proc, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _peak_mb() -> float:
    """Peak RSS since exec (or since ``_reset_peak_rss``): VmHWM where /proc has it, else ru_maxrss."""
    hwm = _proc_status_mb("VmHWM")
    return hwm if hwm == hwm else _rss_mb()


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM, which ru_maxrss reports)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_main(args) -> None:
    """Run one build in this (fresh) process and print its peak RSS as one JSON line.

    Imports (Beam, torch, synpref) are done first and the peak is then reset where Linux
    allows it, so ``peak_rss_mb`` (VmHWM) is the resident memory at the build's high-water
    mark, not an import-time transient. The DirectRunner runs the build in this process.
    ``ru_maxrss_mb`` is getrusage's figure at exit; it can also carry the parent's RSS at
    fork time (Linux keeps it across exec), which is why the parent measures memory first.
    """
    logging.basicConfig(level=logging.WARNING)
    for h in logging.getLogger().handlers:
        h.addFilter(_BeamNoise())
    cfg = make_config(args.prompt_file, args.size, args.out)
    import apache_beam  # noqa: F401  (imports before the "before" mark: they are not the data plane)

    import synpref.pipelines.build_preferences  # noqa: F401
    from synpref.transforms.generators import create_generator

    if cfg.torch_threads > 0:
        import torch  # noqa: F401  (the workers import it to set their thread count)
    create_generator(cfg.generators[0]).generate(["warm-up"], [0])
    import_peak = _peak_mb()
    reset = _reset_peak_rss()
    before = _proc_status_mb("VmRSS")
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    wall, result = run_build(cfg, shlex.split(args.beam_args))
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print("BENCH_CHILD " + json.dumps({
        "size": args.size, "prompts": result["manifest"]["counts"]["prompts"]["written"],
        "images": result["manifest"]["counts"]["candidates"]["written"], "wall_s": round(wall, 2),
        "import_peak_rss_mb": round(import_peak, 1), "peak_reset": reset,
        "rss_before_mb": round(before, 1), "peak_rss_mb": round(_peak_mb(), 1),
        "ru_maxrss_mb": round(_rss_mb(), 1),
        # worker subprocesses (e.g. --direct_running_mode=multi_processing); 0 when the build ran in-process
        "children_peak_rss_mb": round(children, 1) if children > children_before else 0.0}), flush=True)


class _BeamNoise(logging.Filter):
    """Beam's RunInference logs this once per batch when its optional model manager fails to import."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resource module is not available" not in record.getMessage()


def measure_memory(size: int, n_prompts: int, work: str, beam_args: str) -> dict:
    tag = f"mem-{size}-{n_prompts}"
    prompt_file = write_prompt_file(f"{work}/{tag}.txt", n_prompts)
    out = f"{work}/{tag}"
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--size", str(size), "--prompt-file", prompt_file,
           "--out", out, "--beam-args", beam_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_CHILD "):
            return json.loads(line[len("BENCH_CHILD "):])
    log_path = f"{work}/{tag}.log"
    with open(log_path, "w") as f:
        f.write(proc.stdout + proc.stderr)
    sys.stderr.write(proc.stderr)  # the whole story: a failure's first traceback is rarely its last lines
    errors = [line for line in proc.stderr.splitlines() if line and not line[0].isspace() and "Error" in line]
    raise RuntimeError(f"memory child ({size} px, {n_prompts} prompts) failed with exit {proc.returncode}; "
                       f"first error: {errors[0] if errors else '?'}; last error: {errors[-1] if errors else '?'}")


# --- driver -----------------------------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,256,512", help="image sizes (px) for the throughput runs")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per throughput run (x4 images)")
    ap.add_argument("--mem-prompts", type=int, default=32, help="prompts of the 1x memory run (4x = 4 times this)")
    ap.add_argument("--mem-sizes", default="256,512", help="image sizes (px) for the memory runs")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--workdir", default=None, help="keep outputs here (default: a temp dir, removed at the end)")
    ap.add_argument("--beam-args", default="", help='Beam flags for every build, e.g. "--direct_num_workers=1"')
    # internal: one memory run in a fresh process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child_main(args)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    for h in logging.getLogger().handlers:
        h.addFilter(_BeamNoise())
    t_all = time.perf_counter()
    work = args.workdir or tempfile.mkdtemp(prefix="synpref-bench-dp-")
    os.makedirs(work, exist_ok=True)
    beam_args = shlex.split(args.beam_args)
    failures = []
    rows, mem_rows = [], []

    if not args.skip_memory:  # first, while this process is small (see child_main)
        for size in _ints(args.mem_sizes):
            for mult in (1, 4):
                try:
                    m = measure_memory(size, args.mem_prompts * mult, work, args.beam_args)
                    m["mult"] = mult
                    mem_rows.append(m)
                    print(f"memory {size}px x{mult}: {json.dumps(m)}", flush=True)
                except Exception as e:
                    failures.append(str(e))
                    print(e, file=sys.stderr, flush=True)

    if not args.skip_throughput:
        # one tiny build first: one-time imports and lazy set-up are not the data plane
        warm = write_prompt_file(f"{work}/warmup.txt", 4)
        try:
            run_build(make_config(warm, 64, f"{work}/warmup"), beam_args)
        except Exception:  # the timed builds below fail the same way and are reported there
            traceback.print_exc()
        shutil.rmtree(f"{work}/warmup", ignore_errors=True)
        prompt_file = write_prompt_file(f"{work}/prompts-{args.prompts}.txt", args.prompts)
        for size in _ints(args.sizes):
            pipe_out, base_out = f"{work}/build-{size}", f"{work}/loop-{size}"
            row = {"size": size}
            try:
                wall, result = run_build(make_config(prompt_file, size, pipe_out), beam_args)
                counts = result["manifest"]["counts"]
                row.update(pipe_s=wall, images=counts["candidates"]["written"], pairs=counts["pairs"]["written"],
                           shards=len(result["manifest"]["shards"]),
                           busy=result["summary"].get("stage_busy_seconds", {}))
            except Exception as e:  # the pipeline is being changed: report, keep measuring the rest
                failures.append(f"build at {size} px: {type(e).__name__}: {e}")
                traceback.print_exc()
            base_s, base_counts = run_baseline(make_config(prompt_file, size, base_out), base_out)
            row.update(base_s=base_s, base_images=base_counts["images"], base_pairs=base_counts["pairs"],
                       base_shards=base_counts["shards"])
            if "pipe_s" in row:
                row["same_images"] = png_digests(pipe_out) == png_digests(base_out)
            rows.append(row)
            shutil.rmtree(pipe_out, ignore_errors=True)
            shutil.rmtree(base_out, ignore_errors=True)
            _print_row(row)

    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    _print_tables(args, rows, mem_rows, time.perf_counter() - t_all)
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


def _print_row(row: dict) -> None:
    loop = f"plain loop {row['base_images']} images, {row['base_pairs']} pairs, {row['base_shards']} shards in {row['base_s']:.1f}s"
    if "pipe_s" in row:
        print(f"{row['size']}px: build {row['images']} images, {row['pairs']} pairs, {row['shards']} shards in "
              f"{row['pipe_s']:.1f}s; {loop}; same images: {row['same_images']}", flush=True)
    else:
        print(f"{row['size']}px: build FAILED; {loop}", flush=True)


def _print_tables(args, rows: list[dict], mem_rows: list[dict], total_s: float) -> None:
    print(f"\n== data plane bench: procedural generator, {K} candidates/prompt, reward sharpness, "
          f"{SAMPLES_PER_SHARD}/shard, DirectRunner {args.beam_args or '(default args)'}, torch_threads=1, "
          f"{os.cpu_count()} CPUs ==")
    if rows:
        print(f"throughput, {args.prompts} prompts per size:")
        print(f"{'size':>6} {'images':>7} {'pairs':>6} {'shards':>6} {'build s':>8} {'build img/s':>12} "
              f"{'loop s':>7} {'loop img/s':>11} {'build/loop':>11} {'same imgs':>10}  build busy s (gen/score/write)")
        for r in rows:
            base_ips = r["base_images"] / r["base_s"]
            if "pipe_s" not in r:
                print(f"{r['size']:>6} {'-':>7} {'-':>6} {'-':>6} {'FAILED':>8} {'-':>12} {r['base_s']:>7.1f} "
                      f"{base_ips:>11.1f} {'-':>11} {'-':>10}")
                continue
            ips = r["images"] / r["pipe_s"]
            b = r["busy"]
            busy = "/".join(f"{b[k]:.1f}" if k in b else "-" for k in ("generate", "score", "write"))
            print(f"{r['size']:>6} {r['images']:>7} {r['pairs']:>6} {r['shards']:>6} {r['pipe_s']:>8.1f} {ips:>12.1f} "
                  f"{r['base_s']:>7.1f} {base_ips:>11.1f} {ips / base_ips:>10.2f}x {str(r['same_images']):>10}  {busy}")
        for r in rows:
            if "pipe_s" in r:
                ratio = (r["images"] / r["pipe_s"]) / (r["base_images"] / r["base_s"])
                same = (r["images"], r["pairs"], r["shards"]) == (r["base_images"], r["base_pairs"], r["base_shards"])
                print(f"  {r['size']}px: data plane {ratio:.2f}x of plain loop"
                      + ("" if same else f" (OUTPUTS DIFFER: loop wrote {r['base_images']} images, "
                                         f"{r['base_pairs']} pairs, {r['base_shards']} shards)"))
    if mem_rows:
        print(f"peak memory, one build per fresh process, {args.mem_prompts} and {4 * args.mem_prompts} prompts "
              f"(peak = VmHWM after imports, reset before the build; ru_maxrss at exit beside it):")
        print(f"{'size':>6} {'prompts':>8} {'images':>7} {'wall s':>7} {'RSS before MB':>14} {'peak RSS MB':>12} "
              f"{'build adds MB':>14} {'ru_maxrss MB':>13} {'import peak MB':>15}")
        for m in mem_rows:
            print(f"{m['size']:>6} {m['prompts']:>8} {m['images']:>7} {m['wall_s']:>7.1f} {m['rss_before_mb']:>14.0f} "
                  f"{m['peak_rss_mb']:>12.0f} {m['peak_rss_mb'] - m['rss_before_mb']:>14.0f} "
                  f"{m['ru_maxrss_mb']:>13.0f} {m['import_peak_rss_mb']:>15.0f}"
                  + ("" if m["peak_reset"] else " (peak not reset: includes imports)")
                  + (f"  (worker processes' peak {m['children_peak_rss_mb']:.0f} MB)" if m["children_peak_rss_mb"] else ""))
        by = {(m["size"], m["mult"]): m for m in mem_rows}
        for size in sorted({m["size"] for m in mem_rows}):
            if (size, 1) in by and (size, 4) in by:
                one, four = by[(size, 1)], by[(size, 4)]
                ratio = four["peak_rss_mb"] / one["peak_rss_mb"]
                add1 = one["peak_rss_mb"] - one["rss_before_mb"]
                add4 = four["peak_rss_mb"] - four["rss_before_mb"]
                print(f"  {size}px: peak RSS 4x/1x = {ratio:.2f}x (goal <= {MEM_GOAL}x: "
                      f"{'met' if ratio <= MEM_GOAL else 'not met'}); memory the build adds: {add1:.0f} -> {add4:.0f} MB"
                      + (f" ({add4 / add1:.1f}x)" if add1 > 1 else ""))
    print(f"total bench time {total_s:.0f}s")


if __name__ == "__main__":
    sys.exit(main())
