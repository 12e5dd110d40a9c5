"""Why a finished run should not count as a success (an empty list: it should). The CLI exits 1 on any."""
from __future__ import annotations

from typing import Any

from ..transforms.accounting import ERROR_REASONS


def unbalanced(counts: dict[str, Any]) -> list[str]:
    return [f"ledger does not balance for {level}: in {v['in']} != written {v['written']} + dropped "
            f"{v['dropped_total']}" for level, v in counts.items() if not v["balanced"]]


def build_problems(manifest: dict[str, Any], cfg) -> list[str]:
    """A ledger that does not balance, nothing written, or any generator or reward that lost more
    than ``max_error_share`` of its items to errors (each one is in dead_letter/ with its reason)."""
    num_generators, max_error_share = len(cfg.generators), cfg.max_error_share
    c, errors = manifest["counts"], manifest.get("errors_by_stage", {})
    problems = unbalanced(c)
    if c["prompts"]["written"] == 0:
        problems.append("no prompt produced a sample: see the dropped counts above and dead_letter/")
    per_generator = c["candidates"]["in"] // max(1, num_generators)
    generated = c["candidates"]["in"] - sum(e["count"] for stage, e in errors.items() if stage.startswith("generate:"))
    for stage, e in sorted(errors.items()):
        what, name = stage.split(":", 1)
        attempted = per_generator if what == "generate" else max(1, generated)
        if e["count"] > max_error_share * attempted:
            kind = "generator" if what == "generate" else "reward"
            problems.append(f"{kind} {name}: {e['count']} of {attempted} images failed "
                            f"(max_error_share {max_error_share}); first: {e['first']}")
    return problems


def filter_problems(manifest: dict[str, Any]) -> list[str]:
    """An unbalanced ledger (any level), or samples lost to scoring errors or unreadable shards."""
    counts = manifest["counts"]
    problems = unbalanced(counts)
    dropped = counts.get("samples", {}).get("dropped", {})
    errors = sum(n for r, n in dropped.items() if r in ("scoring_error", "unreadable_shard"))
    if errors:
        problems.append(f"{errors} sample(s) lost to scoring errors or unreadable shards: see dead_letter/")
    return problems


def evaluate_health(seeds_per_prompt: int, models: list[str], max_error_share: float,
                    rows: list[dict[str, Any]], drops: list[dict[str, Any]]) -> dict[str, Any]:
    """An evaluation's images written and lost per model, losses per reason and stage, and its problems.

    A model's images are expected for every prompt seen (in the samples or in a candidate drop); a model
    or judge that loses more than ``max_error_share`` of its images is a problem (exit 1).
    """
    written = {m: 0 for m in models}
    prompt_ids = set()
    for r in rows:
        written[r["model"]] += 1
        prompt_ids.add(r["prompt_id"])
    for d in drops:
        if d["level"] == "candidate":
            prompt_ids.add(d["record_id"].split("-", 1)[0])
    expected = len(prompt_ids) * seeds_per_prompt
    reasons: dict[str, int] = {}
    by_stage: dict[str, dict[str, Any]] = {}
    for d in drops:
        reasons[f"{d['level']}:{d['reason']}"] = reasons.get(f"{d['level']}:{d['reason']}", 0) + 1
        if d["reason"] in ERROR_REASONS:
            e = by_stage.setdefault(d["stage"], {"count": 0, "first": f"{d['reason']}: {d['detail']}"})
            e["count"] += 1
    problems = []
    if not rows:
        problems.append("no image was scored: see dead_letter.jsonl")
    for stage, e in sorted(by_stage.items()):
        attempted = expected if stage.startswith("generate:") else max(1, expected * len(models))
        if e["count"] > max_error_share * attempted:
            problems.append(f"{stage}: {e['count']} of {attempted} images lost (max_error_share "
                            f"{max_error_share}); first: {e['first']}")
    return {"prompts": len(prompt_ids), "images_expected_per_model": expected, "images_written": written,
            "dropped": dict(sorted(reasons.items())), "errors_by_stage": by_stage, "problems": problems}
