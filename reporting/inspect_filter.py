"""``synpref inspect`` on a ``synpref filter`` output (its manifest says ``"job": "filter"``).

As for a build, everything is read from the folder given: the filtered shards named by the manifest
(missing, truncated or miscounted ones are findings naming the file), the per-sample index Parquet
(every input sample with its scores, kept flag and reason) and the dead letters (same schema as the
build's, so the drops table is the build's). Tables are polars: counts per ledger level, drops by reason,
each reward's score distribution over every scored sample and over the kept ones, and reward agreement
(Kendall tau-b between two rewards over every scored sample, kept and dropped: one corpus-wide group).
For the HTML page it also collects the first kept samples (from the filtered shards) and a few dropped
samples per reason, their images read back from the input through the same source reader the filter's
writer uses (an input that is gone or unreadable shows the reason instead of a picture).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import fsspec
import polars as pl

from ..core.errors import error_text
from .inspect_build import (_READ_ERRORS, _counts_table, _drops_table, check_sha256,
                                         check_tar, iter_tar_samples, kendall_tau_b, ledger_problems, level_lines,
                                         reward_label, table_lines)

UNSCORED = "__shard__"  # the record id of an unreadable rest of an input shard: no image, no scores


@dataclass
class FilterReport:
    output_dir: str
    manifest: dict
    counts: pl.DataFrame
    drops: pl.DataFrame            # level, reason, stage, count (from dead_letter/*.jsonl)
    scores: pl.DataFrame           # one row per input sample: key, kept, reason, <reward>..., _file (index file)
    score_stats: pl.DataFrame      # reward, n, min, median, max, n_kept, kept_min, kept_median
    agreement: pl.DataFrame        # reward x reward Kendall tau-b over every scored sample
    agreement_groups: pl.DataFrame  # samples each tau is over
    cutoffs: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # reward -> (value, label)
    kept_samples: list[dict] = field(default_factory=list)     # {"key", "caption", "scores", "image", "suffix"}
    dropped_samples: dict[str, list[dict]] = field(default_factory=dict)  # reason -> {"key", ..., "image"|"why"}
    findings: list[str] = field(default_factory=list)
    verified: bool = False
    job: str = "filter"

    @property
    def rewards(self) -> list[str]:
        return [r["name"] for r in self.manifest["rewards"]]


def verify_filter(manifest: dict, out: str) -> list[str]:
    """Problems found re-reading the filter output in ``out`` (empty = all good): every filtered shard is
    there, reads to the end, holds the samples and bytes the manifest says; index and dead-letter files
    exist; every ledger level balances."""
    problems = []
    for s in manifest["shards"]:
        problems += check_tar(f"{out}/{s['tar']}", s["samples"], s.get("size"))
        problems += check_sha256(f"{out}/{s['tar']}", s.get("sha256"))
        problems += check_keys(f"{out}/{s['tar']}")
    fs = fsspec.core.url_to_fs(out)[0]
    for rel in manifest.get("index_files", []) + manifest.get("dead_letter_files", []):
        if not fs.exists(fsspec.core.url_to_fs(f"{out}/{rel}")[1]):
            problems.append(f"{out}/{rel}: missing")
    return problems + ledger_problems(manifest["counts"])


def check_keys(tar: str) -> list[str]:
    """A finding for the first sample that a WebDataset reader would not read back whole: readers cut member
    names at the first dot, so a key with a dot leaves ``json``/``txt`` under another suffix."""
    try:
        for raw in iter_tar_samples(tar):
            if "json" not in raw or "txt" not in raw:
                members = sorted(k for k in raw if k != "__key__")
                return [f"{tar}: sample {raw['__key__']!r} reads back with members {members}: its key does "
                        "not split back whole (a dot in the key?)"]
    except _READ_ERRORS:
        return []  # check_tar names it
    return []


_DETAIL_COLUMNS = {"source_shard": pl.Utf8, "image_member": pl.Utf8, "image_offset": pl.Int64,
                   "image_size": pl.Int64, "caption": pl.Utf8, "detail": pl.Utf8}


def _index_table(out: str, manifest: dict, rewards: list[str], findings: list[str]) -> pl.DataFrame:
    """key, kept, reason and one column per reward for every input sample (``_file``: which index file).

    Only these columns are read (captions and details stay on disk until a card needs them), so a corpus of
    millions of samples fits in memory.
    """
    frames = []
    for i, rel in enumerate(manifest.get("index_files", [])):
        try:
            names = set(pl.read_parquet_schema(f"{out}/{rel}"))
            df = pl.read_parquet(f"{out}/{rel}", columns=[c for c in ("key", "kept", "reason") if c in names]
                                 + [f"score_{r}" for r in rewards if f"score_{r}" in names])
        except FileNotFoundError:
            continue  # verify_filter reports it
        except Exception as exn:  # noqa: BLE001 - an unreadable index is a finding, not a crash
            findings.append(f"{out}/{rel}: unreadable index ({error_text(exn)})")
            continue
        frames.append(df.select(
            [(pl.col(c) if c in df.columns else pl.lit(None)).cast(t).alias(c)
             for c, t in (("key", pl.Utf8), ("kept", pl.Boolean), ("reason", pl.Utf8))]
            + [(pl.col(f"score_{r}") if f"score_{r}" in df.columns else pl.lit(None)).cast(pl.Float64).alias(r)
               for r in rewards] + [pl.lit(i, pl.Int64).alias("_file")]))
    if not frames:
        return pl.DataFrame(schema={"key": pl.Utf8, "kept": pl.Boolean, "reason": pl.Utf8,
                                    **{r: pl.Float64 for r in rewards}, "_file": pl.Int64})
    return pl.concat(frames).sort(["key", "_file"])


def _score_stats(scores: pl.DataFrame, rewards: list[str]) -> pl.DataFrame:
    rows = []
    for r in rewards:
        col, kept = scores[r].drop_nulls(), scores.filter(pl.col("kept"))[r].drop_nulls()
        rows.append({"reward": r, "n": col.len(), "min": col.min(), "median": col.median(), "max": col.max(),
                     "n_kept": kept.len(), "kept_min": kept.min(), "kept_median": kept.median()})
    return pl.DataFrame(rows, schema={"reward": pl.Utf8, "n": pl.Int64, "min": pl.Float64, "median": pl.Float64,
                                      "max": pl.Float64, "n_kept": pl.Int64, "kept_min": pl.Float64,
                                      "kept_median": pl.Float64})


def corpus_agreement(scores: pl.DataFrame, rewards: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Kendall tau-b between every two rewards over every sample both scored (kept and dropped alike)."""
    taus, ns = {}, {}
    for i, a in enumerate(rewards):
        for b in rewards[i:]:
            both = scores.select(pl.col(a).alias("x"), pl.col(b).alias("y")).drop_nulls()
            ns[a, b] = ns[b, a] = both.height
            taus[a, b] = taus[b, a] = (kendall_tau_b(both["x"].to_numpy(), both["y"].to_numpy())
                                       if both.height >= 2 else float("nan"))
    matrix = pl.DataFrame({"reward": rewards, **{b: [taus[a, b] for a in rewards] for b in rewards}})
    groups = pl.DataFrame({"reward": rewards, **{b: [ns[a, b] for a in rewards] for b in rewards}})
    return matrix, groups


def filter_cutoffs(manifest: dict) -> dict[str, list[tuple[float, str]]]:
    """Each reward's thresholds and top-fraction cutoff, as (score, label) marks for its histogram."""
    f = manifest.get("config", {}).get("filter", {})
    marks: dict[str, list[tuple[float, str]]] = {}
    for t in f.get("thresholds") or []:
        for bound in ("min", "max"):
            if t.get(bound) is not None:
                marks.setdefault(t["reward"], []).append((float(t[bound]), bound))
    top, cutoff = f.get("top_fraction"), manifest.get("top_fraction_cutoff")
    if top and cutoff is not None:
        marks.setdefault(top["reward"], []).append((float(cutoff), f"top {top['fraction']:.0%}"))
    return marks


def _kept_samples(out: str, manifest: dict, n: int, findings: list[str]) -> list[dict]:
    got: list[dict] = []
    for s in manifest["shards"]:
        if len(got) >= n:
            break
        tar = f"{out}/{s['tar']}"
        try:
            for raw in iter_tar_samples(tar):
                if len(got) >= n:
                    break
                meta = json.loads(raw.get("json", b"{}"))
                suffix = next((k for k in sorted(raw) if k not in ("__key__", "json", "txt")), "")
                got.append({"key": raw["__key__"], "caption": raw.get("txt", b"").decode("utf-8", "replace"),
                            "scores": meta.get("synpref_scores", {}), "image": raw.get(suffix), "suffix": suffix})
        except FileNotFoundError:
            continue  # verify_filter reports it
        except (*_READ_ERRORS, UnicodeDecodeError) as exn:
            if not any(f.startswith(f"{tar}:") for f in findings):
                findings.append(f"{tar}: unreadable ({error_text(exn)})")
    return got


def _source_reader(manifest: dict):
    """A function (url, member, offset, size) -> image bytes, through the job's own input reader."""
    from ..transforms.corpus_sources import CorpusInput

    given = manifest["config"]["input"]  # as the job resolved it: format and per-format options
    inputs = CorpusInput(given.get("format", "auto"), {"parquet": given.get("parquet") or {}})

    def read(url: str, member: str, offset: int, size: int) -> bytes:
        reader = inputs.source_for(url).open_images(url)
        try:
            return reader.read(member, offset, size)
        finally:
            reader.close()

    return read


def _dropped_samples(out_dir: str, scores: pl.DataFrame, manifest: dict, per_reason: int) -> dict[str, list[dict]]:
    """Up to ``per_reason`` dropped samples per reason (smallest keys), each with its image bytes or why not."""
    dropped = scores.filter(~pl.col("kept") & (pl.col("key") != UNSCORED))
    if per_reason <= 0 or dropped.height == 0:
        return {}
    picked = dropped.group_by("reason", maintain_order=True).head(per_reason).sort(["reason", "key", "_file"])
    details = {}  # (file, key) -> the index row's location, caption and detail, read only for the picked keys
    for (i,), g in picked.group_by(["_file"]):
        path = f"{out_dir}/{manifest['index_files'][i]}"
        try:
            names = set(pl.read_parquet_schema(path))
            rows = pl.read_parquet(path, columns=["key", *[c for c in _DETAIL_COLUMNS if c in names]]) \
                .filter(pl.col("key").is_in(g["key"].implode()))
        except Exception:  # noqa: BLE001 - already a finding of _index_table
            continue
        details.update({(i, r["key"]): r for r in rows.iter_rows(named=True)})
    try:
        read = _source_reader(manifest)
    except Exception as exn:  # noqa: BLE001 - an old or foreign manifest: show the drops without pictures
        read, why = None, f"input not readable here ({error_text(exn)})"
    rewards = [r["name"] for r in manifest["rewards"]]
    out: dict[str, list[dict]] = {}
    for row in picked.iter_rows(named=True):
        d = details.get((row["_file"], row["key"]), {})
        item = {"key": row["key"], "caption": d.get("caption") or "", "detail": d.get("detail") or "",
                "source_shard": d.get("source_shard") or "",
                "scores": {r: row[r] for r in rewards if row.get(r) is not None}}
        if read is None:
            item["why"] = why
        elif not d.get("image_member") or d.get("image_offset") is None or d["image_offset"] < 0:
            item["why"] = "no image member"
        else:
            try:
                item["image"] = read(d["source_shard"], d["image_member"], d["image_offset"], d["image_size"])
            except Exception as exn:  # noqa: BLE001 - a moved or broken input: say so on the card
                item["why"] = f"input not readable ({error_text(exn)})"
        out.setdefault(row["reason"], []).append(item)
    return out


def collect_filter_report(output_dir: str, manifest: dict, samples: int = 12, per_reason: int = 3,
                          verify_shards: bool = True) -> FilterReport:
    """Read a finished filter output once: tables, the first ``samples`` kept samples, a few drops per reason.

    Raises:
        ValueError: a manifest from before the shared ledger (flat ``counts``): rerun the filter job.
    """
    out = output_dir.rstrip("/")
    if not all(isinstance(c, dict) for c in manifest["counts"].values()):
        raise ValueError(f"{out}/manifest.json was written by an older synpref filter (flat counts); rerun the "
                         "filter job to inspect it")
    rewards = [r["name"] for r in manifest["rewards"]]
    findings = verify_filter(manifest, out) if verify_shards else []
    scores = _index_table(out, manifest, rewards, findings)
    c = manifest["counts"].get("samples")
    if c and manifest.get("index_files") and not any("index" in f for f in findings):
        kept = int(scores["kept"].sum())
        if scores.height != c["in"] or kept != c["written"]:
            findings.append(f"{out}/index: {scores.height} samples ({kept} kept), manifest says in={c['in']} "
                            f"written={c['written']}")
    scored = scores.filter(pl.col("key") != UNSCORED)
    agreement, agreement_groups = corpus_agreement(scored, rewards)
    return FilterReport(
        output_dir=out, manifest=manifest, counts=_counts_table(manifest), drops=_drops_table(out, findings),
        scores=scores, score_stats=_score_stats(scored, rewards), agreement=agreement,
        agreement_groups=agreement_groups, cutoffs=filter_cutoffs(manifest),
        kept_samples=_kept_samples(out, manifest, samples, findings) if samples else [],
        dropped_samples=_dropped_samples(out, scores, manifest, per_reason if samples else 0),
        findings=findings, verified=verify_shards)


def describe_filter(manifest: dict) -> str:
    """The filter settings in one line (mode, thresholds, top fraction with its cutoff, dedup)."""
    f = manifest.get("config", {}).get("filter", {})
    parts = [f"{t['reward']} {'>= ' + format(t['min'], 'g') if t.get('min') is not None else ''}"
             f"{' and ' if t.get('min') is not None and t.get('max') is not None else ''}"
             f"{'<= ' + format(t['max'], 'g') if t.get('max') is not None else ''}" for t in f.get("thresholds") or []]
    top = f.get("top_fraction")
    if top:
        cut = manifest.get("top_fraction_cutoff")
        parts.append(f"top {top['fraction']:.0%} by {top['reward']}"
                     + (f" (cutoff {cut:.4g})" if cut is not None else ""))
    near = f.get("near_duplicate_distance", -1)
    sem = f.get("semantic_dedup")
    return (f"mode {f.get('mode', 'and')}: " + ("; ".join(parts) or "no score criteria")
            + f"; dedup {f.get('dedup', 'exact')}" + (f", near duplicates within {near} bits" if near >= 0 else "")
            + (f", semantic duplicates at cosine >= {sem['threshold']:g} ({sem['embedder']['name']} embeddings, "
               f"{sem['num_clusters']} clusters)" if sem else ""))


def format_filter_text(rep: FilterReport) -> str:
    m = rep.manifest
    lines = [f"filter output {rep.output_dir}  (synpref {m['synpref_version']})",
             "rewards: " + ", ".join(reward_label(r) for r in m["rewards"]),
             f"input: {len(m.get('input_shards', []))} shard(s)",
             "filter: " + describe_filter(m)]
    lines += level_lines(m["counts"])
    lines.append(f"shards: {len(m['shards'])} filtered")
    for s in rep.kept_samples:
        scores = ", ".join(f"{k}={v:.4g}" for k, v in s["scores"].items())
        lines.append(f"  kept {s['key']} {s['caption'][:60]!r}: {scores}")
    lines += table_lines(rep, "scores per reward (every scored sample; kept_*: the written ones):",
                         "reward agreement (Kendall tau-b over every scored sample, kept and dropped):")
    return "\n".join(lines)
