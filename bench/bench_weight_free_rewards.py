"""What each weight-free reward prefers, and what it costs: Kendall tau against known damage, ms per image.

Uses the photographs and degradations of ``tests/test_weight_free_rewards.py`` (scikit-image's photographs,
damaged at levels 0..3; tau +1 = the reward orders them clean first, -1 = most damaged first; "tie" = the
reward gives all four the same score; means leave ties out). Time: the fastest of ``--repeats``
single-image calls on the 512x512 astronaut photograph (fastest, so other load on the machine counts less).

    python bench/bench_weight_free_rewards.py [--repeats 20]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_weight_free_rewards import PHOTOS, photo, series, tau_vs_levels  # noqa: E402

from synpref.transforms.rewards import create_reward  # noqa: E402

REWARDS = ["brisque", "sharpness", "jpeg_compressibility", "jpeg_incompressibility", "near_blank",
           "colourfulness", "resolution", "aspect_ratio"]
KINDS = ["combined", "blur", "noise", "jpeg", "combined_heavy_noise"]


def fmt(t: float) -> str:
    return "tie" if math.isnan(t) else f"{t:+.2f}"


def mean(taus: list[float]) -> float:
    """Mean over the photographs where the reward does not tie all four images (NaN if it ties on all)."""
    kept = [t for t in taus if not math.isnan(t)]
    return float(np.mean(kept)) if kept else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    damaged = {(k, n): series(k, n) for k in KINDS for n in PHOTOS}
    probe = Image.fromarray(photo("astronaut"))
    assert probe.size == (512, 512)
    head = ["reward"] + [f"{p} (combined)" for p in PHOTOS] + ["mean combined"] + \
        [f"mean {k}" for k in KINDS[1:]] + ["ms / 512x512"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name in REWARDS:
        reward = create_reward(name)
        reward.load()
        per_kind = {k: [tau_vs_levels(reward.score_batch(damaged[k, n], [""] * 4)) for n in PHOTOS] for k in KINDS}
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            reward.score_batch([probe], [""])
            times.append(time.perf_counter() - t0)
        row = [name] + [fmt(t) for t in per_kind["combined"]] + [fmt(mean(per_kind[k])) for k in KINDS] + \
            [f"{1000 * min(times):.2f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
