"""What each build stage costs, against a baseline measured in the same run.

    python bench/bench_stages.py [--prompts 64] [--workdir out/bench]

Baseline: the same images generated and scored by calling the generators and
rewards directly in a plain Python loop (no Beam, no staging, no shards). The
ratios say what the pipeline adds on top of the model work; machines are noisy,
so only same-run ratios are meaningful.
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

from PIL import Image


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from synpref.cli.main import setup_logging

    setup_logging()
    logging.getLogger("synpref.core.progress").setLevel(logging.WARNING)
    import torch

    from synpref.demo.run import demo_config
    from synpref.demo.tiny_models import save_demo_models
    from synpref.pipelines.build_preferences import build
    from synpref.schemas.config import build_config_from_dict
    from synpref.transforms.generation import make_request
    from synpref.transforms.generators import create_generator
    from synpref.transforms.rewards import create_reward
    from synpref.transforms.prompts import normalize_prompt, prompt_id_of, read_raw_prompts, sample_key
    from synpref.schemas.records import PromptRecord

    work = args.workdir or tempfile.mkdtemp(prefix="synpref-bench-")
    save_demo_models(f"{work}/models")
    data = demo_config("demo_build.yaml", work)
    data["prompts"]["num_prompts"] = args.prompts
    cfg = build_config_from_dict(data)

    # --- pipeline
    t0 = time.perf_counter()
    result = build(cfg)
    wall = time.perf_counter() - t0
    busy = result["summary"]["stage_busy_seconds"]

    # --- baseline: direct calls, same prompts, seeds and batch composition
    torch.set_num_threads(cfg.torch_threads)
    unique = {}
    for r in read_raw_prompts(cfg.prompts):
        text = normalize_prompt(r.text)
        unique.setdefault(prompt_id_of(text), PromptRecord(prompt_id_of(text), text))
    # the pipeline's seeded sample: the smallest sha256(seed:prompt_id)
    prompts = sorted(unique.values(), key=lambda p: sample_key(cfg.seed, p.prompt_id))[: args.prompts]
    gen_s = score_s = 0.0
    rewards = [create_reward(r.name, r.params) for r in cfg.rewards]
    for r in rewards:
        r.load()
    for g in cfg.generators:
        gen = create_generator(g)
        gen.load()
        for p in prompts:
            req = make_request(p, g.id, cfg.candidates_per_generator, cfg.seed)
            t = time.perf_counter()
            images = gen.generate([p.prompt] * len(req.seeds), req.seeds)
            gen_s += time.perf_counter() - t
            pil = [Image.fromarray((im.clip(0, 1) * 255).round().astype("uint8")) for im in images]
            t = time.perf_counter()
            for r in rewards:
                r.score_batch(pil, [p.prompt] * len(pil))
            score_s += time.perf_counter() - t

    n_img = result["manifest"]["counts"]["candidates"]["written"]
    print(f"\nbench: {args.prompts} prompts, {n_img} images, tiny 64px models, CPU, torch_threads={cfg.torch_threads}")
    print(f"{'stage':<10}{'pipeline s':>12}{'baseline s':>12}{'ratio':>8}")
    for stage, base in (("generate", gen_s), ("score", score_s)):
        got = busy.get(stage, float("nan"))
        print(f"{stage:<10}{got:>12.2f}{base:>12.2f}{got / base:>8.2f}")
    print(f"{'write':<10}{busy.get('write', float('nan')):>12.2f}{'-':>12}{'-':>8}")
    print(f"{'wall':<10}{wall:>12.2f}{gen_s + score_s:>12.2f}{wall / (gen_s + score_s):>8.2f}")
    print(f"per 64 prompts: generate {busy.get('generate', 0) * 64 / args.prompts:.1f}s, "
          f"score {busy.get('score', 0) * 64 / args.prompts:.1f}s, write {busy.get('write', 0) * 64 / args.prompts:.1f}s, "
          f"whole build {wall * 64 / args.prompts:.1f}s")


if __name__ == "__main__":
    main()
