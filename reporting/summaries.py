"""Human-readable end-of-job summaries."""
from __future__ import annotations

from typing import Any


def _dropped(level: dict[str, Any]) -> str:
    items = level["dropped"]
    return ", ".join(f"{reason}={n}" for reason, n in sorted(items.items())) or "none"


def build_summary(result: dict[str, Any]) -> str:
    m, s = result["manifest"], result["summary"]
    c = m["counts"]
    problems = s.get("problems") or []
    lines = [
        "== synpref build: " + ("FAILED ==" if problems else
                                "up to date (an identical finished build is here; nothing was run) =="
                                if s.get("up_to_date") else "done =="),
        f"prompts     in {c['prompts']['in']:>6}  written {c['prompts']['written']:>6} groups  "
        f"dropped {c['prompts']['dropped_total']} ({_dropped(c['prompts'])})",
        f"candidates  in {c['candidates']['in']:>6}  written {c['candidates']['written']:>6} images  "
        f"dropped {c['candidates']['dropped_total']} ({_dropped(c['candidates'])})",
        f"pairs       in {c['pairs']['in']:>6}  written {c['pairs']['written']:>6} pairs   "
        f"dropped {c['pairs']['dropped_total']} ({_dropped(c['pairs'])})",
    ]
    unbalanced = [k for k, v in c.items() if not v["balanced"]]
    lines.append("ledger      " + ("balanced: every record written or dropped with a reason" if not unbalanced
                                   else f"NOT balanced for {unbalanced}: see dead_letter/ and report a bug"))
    busy = s.get("stage_busy_seconds") or {}
    stage_txt = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(busy.items())) or "n/a on this runner"
    lines.append(f"time        wall {s['wall_seconds']:.1f}s; busy per stage: {stage_txt}")
    counters = s.get("counters") or {}
    if counters.get("images_reused") or counters.get("shards_skipped"):
        lines.append(f"resumed     {counters.get('images_reused', 0)} staged images reused, "
                     f"{counters.get('shards_skipped', 0)} finished shards kept")
    out = m["output_dir"].rstrip("/")
    lines += [
        f"shards      {len(m['shards'])} ranked + {len(m['shards'])} pairwise under {out}/ranked, {out}/pairs",
        f"manifest    {out}/manifest.json",
        f"dataset     {out}/README.md (datasets.load_dataset(\"{out}\", \"ranked\"))",
        f"dead letter {out}/dead_letter/",
    ]
    if s.get("staging"):
        lines.append(f"staging     {s['staging']}")
    lines += [f"PROBLEM     {p}" for p in problems]
    return "\n".join(lines)


def train_summary(summary: dict[str, Any]) -> str:
    losses = summary.get("losses") or []
    first = summary.get("first_loss", losses[0] if losses else float("nan"))
    last = summary.get("last_loss", losses[-1] if losses else float("nan"))
    return "\n".join([
        "== synpref train: done ==",
        f"loss        {summary.get('config', {}).get('loss', '')} first {first:.6g} -> last {last:.6g} over {summary.get('steps')} steps "
        f"in {summary.get('seconds', 0):.1f}s",
        (f"LoRA        {summary.get('lora_path')}" if summary.get("lora_path")
         else f"model       {summary.get('denoiser_path')} (full fine-tune)"),
        f"summary     {summary.get('output_dir', '').rstrip('/')}/train_summary.json",
    ])
