"""A test-only generator that returns planted images (blank, flat, near-duplicate, low-diversity), and the
helpers the candidate-filter tests derive expected drops with (their own numpy difference hash and
statistics, not synpref's). Importing this module registers ``test_planted``."""
import glob
import itertools
import json

import numpy as np
from PIL import Image

from synpref.schemas.config import build_config_from_dict
from synpref.schemas.records import Lineage
from synpref.transforms.generators import register_generator
from synpref.transforms.generators.base import Generator
from synpref.transforms.generators.procedural import procedural_image


K = 4


def distinct(prompt: str, i: int) -> np.ndarray:
    return (procedural_image(prompt, 1000 + i, 64, 64) * 255).round().astype(np.uint8)


def jitter(px: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(-2, 3, px.shape)
    return np.clip(px.astype(int) + noise, 0, 255).astype(np.uint8)


def flat(value) -> np.ndarray:
    return np.full((64, 64, 3), value, dtype=np.uint8)


def planted() -> dict[str, list[np.ndarray]]:
    base = distinct("lowdiv", 0)
    small_mark = flat((40, 90, 160))
    small_mark[10:15, 20:25] = 255  # 25 of 4096 pixels: 99.4% one colour, grey sd ~ 8
    return {
        "blank": [flat(128), distinct("blank", 1), distinct("blank", 2), distinct("blank", 3)],
        "flat mark": [distinct("flat mark", 0), small_mark, distinct("flat mark", 2), distinct("flat mark", 3)],
        "dup": [distinct("dup", 0), distinct("dup", 1), jitter(distinct("dup", 0), 7), distinct("dup", 3)],
        "lowdiv": [base, jitter(base, 1), jitter(base, 2), jitter(base, 3)],
        "collapse": [flat(0), flat(255), flat((30, 200, 30)), distinct("collapse", 3)],
        "normal": [distinct("normal", i) for i in range(K)],
    }


PLANTED = planted()


@register_generator("test_planted")
class PlantedGenerator(Generator):
    """One call = one prompt's K seeds in candidate order: image i of the prompt's planted list."""

    def load(self):
        pass

    def generate(self, prompts, seeds):
        return [PLANTED[p][i % K].astype(np.float32) / 255.0 for i, p in enumerate(prompts)]

    def files(self):
        return {}

    def lineage(self, seed):
        return Lineage(generator_id=self.config.id, model=self.config.model, revision="main",
                       pipeline_class="planted", scheduler="none", num_inference_steps=0, guidance_scale=0.0,
                       height=64, width=64, dtype="float32", seed=int(seed))


# ---- the test's own reference: difference hash bits and image statistics in numpy

def bits(px: np.ndarray) -> np.ndarray:
    grey = np.asarray(Image.fromarray(px).convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=float)
    return (grey[:, 1:] > grey[:, :-1]).ravel()


def distance(a: np.ndarray, b: np.ndarray) -> int:
    return int((bits(a) != bits(b)).sum())


def grey_sd(px: np.ndarray) -> float:
    return float(np.asarray(Image.fromarray(px).convert("L"), dtype=float).std())


def largest_colour_share(px: np.ndarray) -> float:
    _, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
    return counts.max() / counts.sum()


def expected(images: list[np.ndarray], min_sd=2.0, max_flat=0.99, low_div=8, near=4):
    """(candidate drops {index: reason}, group reason) by the rules in docs/math.md, from the pixels."""
    drops = {i: "degenerate_image" for i, px in enumerate(images)
             if grey_sd(px) < min_sd or largest_colour_share(px) > max_flat}
    kept = [i for i in range(K) if i not in drops]
    if low_div is not None and len(kept) >= 2 and max(distance(images[a], images[b])
                                                      for a, b in itertools.combinations(kept, 2)) <= low_div:
        return {**drops, **{i: "group_dropped" for i in kept}}, "low_diversity_group"
    unique = []
    for i in kept:
        if near is not None and any(distance(images[i], images[u]) <= near for u in unique):
            drops[i] = "near_duplicate_candidate"
        else:
            unique.append(i)
    if len(unique) < 2:
        return {**drops, **{i: "group_dropped" for i in unique}}, "too_few_candidates"
    return drops, ""


def job(out, **filter_cfg):
    return build_config_from_dict(job_dict(out, PLANTED, **filter_cfg))


def job_dict(out, prompt_texts, **filter_cfg) -> dict:
    """The planted build's config as a dict (other tests change its rewards or ranking)."""
    prompts = out.parent / f"{out.name}-prompts.txt"
    prompts.write_text("\n".join(prompt_texts) + "\n")
    return {
        "seed": 0, "candidates_per_generator": K,
        "prompts": {"source": str(prompts)},
        "generators": [{"id": "plant", "type": "test_planted", "model": "synpref/planted", "height": 64, "width": 64}],
        "rewards": [{"name": "sharpness"}, {"name": "colourfulness"}],
        "filter": filter_cfg,
        "output": {"output_dir": str(out), "samples_per_shard": 2, "staging": "keep"},
    }


def dead_letters(out) -> list[dict]:
    return [json.loads(line) for f in glob.glob(f"{out}/dead_letter/*.jsonl") for line in open(f)]
