"""Reward ensemble throughput: shared decode + preprocessing vs the same rewards called one after another.

    .venv/bin/python bench/bench_rewards.py [--images 128] [--size 512] [--chunk 8]

Both sides score the same staged PNGs (procedural images) with the same rewards, in calls of
``--chunk`` images (one prompt's candidates). The baseline is what a loop over rewards does: each
reward decodes the PNGs and preprocesses them itself. The ensemble (what the build runs) decodes
once per call and computes each distinct ``preprocess_key`` once. The models are tiny random ones
(offline) unless ``--arch`` builds a real-size one (random weights): with tiny models the shared
decode/preprocessing weighs more than with ViT-H, so read that ratio as an upper bound on CPU.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def clip_rewards(workdir: str, arch: str = "") -> list:
    """clip_score, laion_aesthetic and hpsv2 on the tiny CLIP, or on ``arch`` (e.g. ViT-H-14) with random
    weights, so the timings are those of the real architecture; plus the weight-free rewards."""
    import open_clip
    from safetensors.torch import save_file

    from synpref.demo.tiny_models import save_tiny_open_clip
    from synpref.transforms.rewards import create_reward

    if arch:
        model = open_clip.create_model(arch, pretrained=None)
        ckpt = os.path.join(workdir, f"{arch}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
        clip = {"model": arch, "checkpoint": ckpt}
        width = model.visual.output_dim
        del model
    else:
        clip = save_tiny_open_clip(os.path.join(workdir, "clip"))
        open_clip.add_model_config(clip["model_config"])
        width = open_clip.create_model(clip["model"], pretrained=None).visual.output_dim
    g = torch.Generator().manual_seed(0)
    dims = [(width, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    head = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), dims):
        head[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i ** 0.5
        head[f"layers.{idx}.bias"] = torch.zeros(o)
    head_path = os.path.join(workdir, "aesthetic_head.safetensors")
    save_file(head, head_path)
    specs = [("clip_score", {**clip, "variant": "cosine"}),
             ("laion_aesthetic", {**clip, "head": head_path}),
             ("hpsv2", {**clip}),
             ("brisque", {}), ("colourfulness", {}), ("sharpness", {})]
    rewards = [create_reward(name, params) for name, params in specs]
    for r in rewards:
        r.load()
    return rewards


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=8, help="images per scoring call (one prompt's candidates)")
    ap.add_argument("--arch", default="", help="open_clip architecture with random weights for the CLIP rewards "
                                               "(e.g. ViT-L-14, ViT-H-14): real-size timings; default a tiny CLIP")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as inside Beam workers on CPU

    from synpref.transforms.generators.procedural import procedural_image
    from synpref.transforms.imageio import decode_image
    from synpref.transforms.scoring import score_ensemble
    from synpref.transforms.staging import encode_png, to_uint8

    with tempfile.TemporaryDirectory() as workdir:
        rewards = clip_rewards(workdir, args.arch)
        pngs = [encode_png(to_uint8(procedural_image(f"prompt {i // args.chunk}", i, args.size, args.size)))
                for i in range(args.images)]
        prompts = [f"prompt {i // args.chunk}" for i in range(args.images)]
        chunks = [range(i, min(i + args.chunk, args.images)) for i in range(0, args.images, args.chunk)]
        score_ensemble(rewards, [decode_image(pngs[0])] * 2, prompts[:2])  # warm-up

        per_reward, baseline = {}, {}
        start = time.perf_counter()
        for r in rewards:
            t = time.perf_counter()
            out = []
            for ch in chunks:
                out += r.score_batch([decode_image(pngs[i]) for i in ch], [prompts[i] for i in ch])
            per_reward[r.name] = time.perf_counter() - t
            baseline[r.name] = out
        sequential = time.perf_counter() - start

        start = time.perf_counter()
        ensemble = {r.name: [] for r in rewards}
        for ch in chunks:
            scores = score_ensemble(rewards, [decode_image(pngs[i]) for i in ch], [prompts[i] for i in ch])
            for name, s in scores.items():
                ensemble[name] += s
        shared = time.perf_counter() - start

    same = all(np.allclose(baseline[n], ensemble[n], equal_nan=True) for n in baseline)
    print(f"== reward ensemble bench: {args.images} images of {args.size}px, {args.chunk} per call, "
          f"torch threads 1, CLIP rewards on {args.arch or 'a tiny CLIP'} (random weights) ==")
    for name, sec in per_reward.items():
        print(f"  {name:<16} alone {args.images / sec:8.1f} img/s  ({sec:.2f}s)")
    print(f"one after another: {sequential:.2f}s ({args.images / sequential:.1f} img/s through all rewards)")
    print(f"ensemble         : {shared:.2f}s ({args.images / shared:.1f} img/s); same scores: {same}")
    print(f"ensemble speed-up: {sequential / shared:.2f}x (goal >= 1.2x)")


if __name__ == "__main__":
    main()
