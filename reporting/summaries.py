"""Human-readable end-of-job summaries, one mechanism for every command: a title line, labelled rows,
then one ``PROBLEM`` line per problem (the command exits 1 when there is any)."""
from __future__ import annotations

from typing import Any, Iterable


def render(command: str, status: str, rows: Iterable[tuple[str, str]], problems: Iterable[str] = ()) -> str:
    """``== synpref <command>: <status> ==`` then ``label       text`` rows (labels padded to 12)."""
    lines = [f"== synpref {command}: {status} =="]
    lines += [f"{label:<11} {text}" for label, text in rows]
    lines += [f"PROBLEM     {p}" for p in problems]
    return "\n".join(lines)


def _dropped(level: dict[str, Any]) -> str:
    items = level["dropped"]
    return ", ".join(f"{reason}={n}" for reason, n in sorted(items.items())) or "none"


def _ledger_row(counts: dict[str, Any], what: str) -> tuple[str, str]:
    unbalanced = [k for k, v in counts.items() if not v["balanced"]]
    return ("ledger", f"balanced: every {what} written or dropped with a reason" if not unbalanced
            else f"NOT balanced for {unbalanced}: see dead_letter/ and report a bug")


def build_summary(result: dict[str, Any]) -> str:
    m, s = result["manifest"], result["summary"]
    c = m["counts"]
    problems = s.get("problems") or []
    status = ("FAILED" if problems else "up to date (an identical finished build is here; nothing was run)"
              if s.get("up_to_date") else "done")
    rows = [
        ("prompts", f"in {c['prompts']['in']:>6}  written {c['prompts']['written']:>6} groups  "
                    f"dropped {c['prompts']['dropped_total']} ({_dropped(c['prompts'])})"),
        ("candidates", f"in {c['candidates']['in']:>6}  written {c['candidates']['written']:>6} images  "
                       f"dropped {c['candidates']['dropped_total']} ({_dropped(c['candidates'])})"),
        ("pairs", f"in {c['pairs']['in']:>6}  written {c['pairs']['written']:>6} pairs   "
                  f"dropped {c['pairs']['dropped_total']} ({_dropped(c['pairs'])})"),
        _ledger_row(c, "record"),
    ]
    busy = s.get("stage_busy_seconds") or {}
    stage_txt = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(busy.items())) or "n/a on this runner"
    rows.append(("time", f"wall {s['wall_seconds']:.1f}s; busy per stage: {stage_txt}"))
    counters = s.get("counters") or {}
    if counters.get("images_reused") or counters.get("shards_skipped"):
        rows.append(("resumed", f"{counters.get('images_reused', 0)} staged images reused, "
                                f"{counters.get('shards_skipped', 0)} finished shards kept"))
    if counters.get("shards_rewritten_changed"):
        rows.append(("verified", f"{counters['shards_rewritten_changed']} shard(s) changed on disk since they "
                                 "were written: rewritten"))
    out = m["output_dir"].rstrip("/")
    rows += [
        ("shards", f"{len(m['shards'])} ranked + {len(m['shards'])} pairwise under {out}/ranked, {out}/pairs"),
        ("manifest", f"{out}/manifest.json"),
        ("dataset", f"{out}/README.md (datasets.load_dataset(\"{out}\", \"ranked\"))"),
        ("dead letter", f"{out}/dead_letter/"),
    ]
    if s.get("staging"):
        rows.append(("staging", s["staging"]))
    return render("build", status, rows, problems)


def filter_summary(result: dict[str, Any]) -> str:
    m, s = result["manifest"], result["summary"]
    c = m["counts"]["samples"]
    reasons = ", ".join(f"{k}={v}" for k, v in c["dropped"].items()) or "none"
    return render("filter", "FAILED" if s["problems"] else "done", [
        ("samples", f"in {c['in']}  written {c['written']}  dropped {c['dropped_total']} ({reasons})"),
        _ledger_row(m["counts"], "sample"),
        ("time", f"wall {s['wall_seconds']}s"),
        ("shards", f"{len(m['shards'])} under {s['manifest'].rsplit('/', 1)[0]}/shards"),
        ("manifest", s["manifest"]),
    ], s["problems"])


def train_summary(summary: dict[str, Any]) -> str:
    losses = summary.get("losses") or []
    first = summary.get("first_loss", losses[0] if losses else float("nan"))
    last = summary.get("last_loss", losses[-1] if losses else float("nan"))
    first, last = (float("nan") if v is None else v for v in (first, last))
    return render("train", "done", [
        ("loss", f"{summary.get('config', {}).get('loss', '')} first {first:.6g} -> last {last:.6g} over "
                 f"{summary.get('steps')} steps in {summary.get('seconds', 0):.1f}s"),
        ("LoRA", summary.get("lora_path")) if summary.get("lora_path")
        else ("model", f"{summary.get('denoiser_path')} (full fine-tune)"),
        ("summary", f"{summary.get('output_dir', '').rstrip('/')}/train_summary.json"),
    ])


def export_summary(summary: dict[str, Any]) -> str:
    expected = summary["manifest_pairs_written"]
    skipped = ", ".join(f"{k}={v}" for k, v in summary["skipped"].items())
    return render(f"export ({summary['format']}, pairs={summary['pairs']})", "done", [
        ("rows", f"{summary['rows']}" + (f" (manifest: {expected} pairs written)" if expected is not None else "")
                 + (f"  skipped {skipped}" if skipped else "")),
        ("label_0=1", f"{summary['label_0_is_winner']} rows"),
        ("files", f"{len(summary['files'])} under {summary['out_dir']}/data/"),
        ("card", f"{summary['out_dir']}/README.md"),
    ])
