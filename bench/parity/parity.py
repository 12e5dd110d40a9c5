"""Labels equal to the authors' code: score the same images with the original reward package and with synpref.

Not part of ``make test``: the authors' packages are installed into their own virtual environment
(``bench/parity/.venvs/<reward>``). That environment sees synpref's stack (torch, transformers,
open_clip...) through a ``.pth`` file, and gets only the authors' package and its small missing
dependencies from PyPI (``--no-deps``), so both sides run the same torch and differ only in their code.

For each reward: random weights of the **full-size** architecture are written in the release's
checkpoint format (speed and agreement do not depend on the weight values), real photographs (the
ones scikit-image bundles, plus crops to other sizes and aspect ratios) are paired with several
prompts, and both implementations score every (image, prompt) in float32 on CPU. Printed: the largest
absolute and relative difference. Goal: within 1e-4 relative.

    .venv/bin/python bench/parity/parity.py hpsv2 [--workdir /tmp/synpref-parity]

Rewards covered: ``hpsv2`` (HPSv2.1, package ``hpsv2``). The others are listed in ``PENDING`` with
what stops them here.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PROMPTS = ["a photograph of an astronaut", "a cup of coffee on a table", "a cat looking at the camera",
           "a rocket on a launch pad at dusk"]
# Authors' packages per reward: (pip requirement, extra small dependencies synpref's stack lacks).
PACKAGES = {"hpsv2": ("hpsv2==1.2.0", ["clint"])}
PENDING = {
    "image_reward": "image-reward pins timm==0.6.13 and fairscale==0.4.13 (a second torch stack); not run here",
    "mps": "no package: the authors' repository (Kwai-Kolors/MPS) must be on PYTHONPATH; not run here",
    "vqascore": "t2v-metrics pulls a full LLaVA stack; not run here",
    "hpsv3": "hpsv3 needs Qwen2-VL-7B-sized random weights (~30 GB fp32); not run on this machine",
}


def photographs() -> list[np.ndarray]:
    """Real photographs at several sizes and aspect ratios (scikit-image's bundled samples, and crops)."""
    from skimage import data

    astronaut, coffee, chelsea, rocket = data.astronaut(), data.coffee(), data.chelsea(), data.rocket()
    return [astronaut, coffee, chelsea, rocket, coffee[:, :150], astronaut[100:164, :]]  # tall, very wide


def make_venv(reward: str, root: Path) -> Path:
    """The reward's virtual environment with the authors' package, reusing synpref's site-packages."""
    venv = root / reward
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        # Lower priority than the venv's own packages: the authors' package (and its pins) win.
        stack = [p for p in sys.path if p.endswith("site-packages")]  # this interpreter's, chained ones included
        Path(site, "synpref-stack.pth").write_text("".join(f"{p}\n" for p in stack))
        requirement, extras = PACKAGES[reward]
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "setuptools", "wheel", "packaging"], check=True)  # to build sdists such as clint
        subprocess.run([*pip, "--no-deps", "--no-build-isolation", requirement, *extras], check=True)
        if reward == "hpsv2":
            # The hpsv2 1.2.0 wheel lacks its tokenizer's vocabulary (bpe_simple_vocab_16e6.txt.gz): put back
            # the same file (OpenAI CLIP's BPE merges, which open_clip ships).
            import shutil

            from open_clip.tokenizer import default_bpe

            shutil.copy(default_bpe(), Path(site, "hpsv2", "src", "open_clip", "bpe_simple_vocab_16e6.txt.gz"))
    return python


def hpsv2_checkpoint(path: Path, seed: int = 0) -> None:
    """Random ViT-H-14 weights saved as the release saves them: torch.save({"state_dict": ...})."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    torch.save({"state_dict": model.state_dict()}, path)


def run(reward: str, workdir: Path) -> dict:
    from PIL import Image

    from synpref.transforms.rewards import create_reward

    workdir.mkdir(parents=True, exist_ok=True)
    python = make_venv(reward, HERE / ".venvs")
    items = []
    for i, pixels in enumerate(photographs()):
        path = workdir / f"photo{i}.png"
        Image.fromarray(pixels).convert("RGB").save(path)
        for prompt in PROMPTS[: 2 if i % 2 else 3]:
            items.append((str(path), prompt))
    if reward != "hpsv2":
        raise SystemExit(f"{reward}: {PENDING.get(reward, 'no parity script')}")
    checkpoint = workdir / "HPS_v2.1_compressed.pt"
    if not checkpoint.exists():
        hpsv2_checkpoint(checkpoint)
    job = workdir / "job.json"
    job.write_text(json.dumps({"checkpoint": str(checkpoint), "version": "v2.1", "items": items}))
    proc = subprocess.run([str(python), str(HERE / f"original_{reward}.py"), str(job)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"original {reward} failed:\n{proc.stderr[-3000:]}")
    original = np.array(json.loads(proc.stdout.strip().splitlines()[-1])["scores"], dtype=np.float64)

    ours = create_reward(reward, {"checkpoint": str(checkpoint), "version": "v2.1", "device": "cpu"})
    ours.load()
    mine = np.array([ours.score_batch([Image.open(p).convert("RGB")], [t])[0] for p, t in items], dtype=np.float64)
    diff = np.abs(mine - original)
    rel = diff / np.maximum(np.abs(original), 1e-12)
    # Random weights put scores near 0, where a relative difference says little: also relative to the
    # spread of the original's scores (only the order within a reward decides labels).
    spread = float(original.max() - original.min())
    result = {"reward": reward, "package": PACKAGES[reward][0], "pairs": len(items), "max_abs_diff": float(diff.max()),
              "max_rel_diff": float(rel.max()), "max_diff_over_spread": float(diff.max()) / max(spread, 1e-12),
              "same_order": bool((np.argsort(mine) == np.argsort(original)).all()),
              "original": original.tolist(), "synpref": mine.tolist()}
    (workdir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reward", choices=sorted(PACKAGES) + sorted(PENDING))
    parser.add_argument("--workdir", default="/tmp/synpref-parity")
    args = parser.parse_args(argv)
    result = run(args.reward, Path(args.workdir) / args.reward)
    print(json.dumps({k: v for k, v in result.items() if k not in ("original", "synpref")}))
    return 0 if result["max_rel_diff"] <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
