"""Why a finished run should not count as a success (an empty list: it should). The CLI exits 1 on any."""
from __future__ import annotations

from typing import Any


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
