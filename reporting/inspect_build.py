"""``synpref inspect``: what a build wrote, re-read from disk and checked against its manifest.

Everything is read from the folder given (``shard_paths(output_dir, shard)``), never from the absolute
paths the manifest recorded at build time, so a copied or moved build is checked as it is now. A shard
that is missing, truncated or not a tar is a *finding* naming the file, never a traceback.

``collect_report`` gathers the figures once (polars tables: counts, drops by reason, per-reward score
distribution, reward agreement); ``format_text`` prints them and ``synpref.reporting.html`` renders
them as one self-contained HTML file. Nothing is unpickled: tar members are read as bytes, JSON is
parsed and images go through ``decode_image``.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

import fsspec
import numpy as np
import polars as pl

from ..core.errors import error_text
from ..core.fileio import sha256_of
from ..transforms.imageio import check_member_name
from ..transforms.writing import SHARD_FILES, shard_paths

_READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


def scan_shard(tar_uri: str) -> tuple[int, list[str]]:
    """Sample count and unsafe members of one shard, from the raw tar listing (nothing is decoded).

    Samples are counted as WebDataset groups them: runs of members sharing the name before the first
    dot. Unsafe: a name ``check_member_name`` refuses (paths, ``..``, hidden) or a non-regular member.
    """
    samples, last, unsafe = 0, None, []
    with fsspec.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            try:
                check_member_name(member.name)
            except ValueError:
                unsafe.append(f"unsafe member name {member.name!r}")
                continue
            if not member.isreg():
                unsafe.append(f"member {member.name!r} is not a regular file")
                continue
            key = member.name.split(".", 1)[0]
            samples += key != last
            last = key
    return samples, unsafe


def iter_tar_samples(tar_uri: str) -> Iterator[dict[str, bytes]]:
    """Raw samples ``{"__key__": key, ext: bytes}`` of one shard; unsafe or non-regular members are skipped.

    Raises whatever reading the tar raises (``OSError``, ``tarfile.TarError``...): callers turn it into a finding.
    """
    current: dict[str, bytes] | None = None
    with fsspec.open(tar_uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            try:
                check_member_name(member.name)
            except ValueError:
                continue
            if not member.isreg():
                continue
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"unexpected end of data in member {member.name!r}")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current


def local_shards(output_dir: str, manifest: dict) -> list[dict]:
    """The manifest's shards with their files resolved under ``output_dir`` (where the build is now)."""
    out = []
    for s in manifest["shards"]:
        paths = shard_paths(output_dir, int(s["shard"])) if "shard" in s else {}
        out.append({**s, **{k: v for k, v in paths.items() if k not in ("name", "stats")}})
    return out


def _file_size(uri: str) -> int | None:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs.size(path)
    except (OSError, ValueError):
        return None


def verify(manifest: dict, output_dir: str | None = None) -> list[str]:
    """Problems found re-reading every shard (empty list = all good).

    With ``output_dir``, shard files are looked up there (``shard_paths``), not at the paths the manifest
    recorded when it was written.
    """
    problems = []
    shards = local_shards(output_dir, manifest) if output_dir else manifest["shards"]
    for s in shards:
        sizes = s.get("sizes") or {}
        for key, expected in (("ranked_tar", s["groups"]), ("pairs_tar", s["pairs"])):
            problems += check_tar(s[key], expected, sizes.get(key))
        problems += [p for key in SHARD_FILES for p in check_sha256(s.get(key, ""), (s.get("sha256") or {}).get(key))]
    return problems + ledger_problems(manifest["counts"])


def check_sha256(uri: str, recorded: str | None) -> list[str]:
    """A finding when the file's bytes no longer hash to what the manifest recorded (an edit in place keeps
    the size: a tar is padded to 10 KiB). Missing files and unrecorded hashes are reported elsewhere."""
    if not recorded or not uri:
        return []
    try:
        now = sha256_of(uri)
    except (OSError, ValueError):
        return []  # missing or unreadable: check_tar names it
    return [] if now == recorded else [f"{uri}: content changed since it was written (sha256 {now[:12]}..., "
                                       f"manifest says {recorded[:12]}...)"]


def check_tar(tar: str, samples: int, size: int | None) -> list[str]:
    """Findings about one tar the manifest lists: missing, unreadable (truncated), unsafe members, or not
    the ``samples`` count and ``size`` bytes it recorded (``size`` None: not recorded)."""
    try:
        got, unsafe = scan_shard(tar)
    except FileNotFoundError:
        return [f"{tar}: missing"]
    except _READ_ERRORS as exn:
        now = _file_size(tar)
        return [f"{tar}: unreadable ({error_text(exn)})"
                + (f"; {now} bytes, manifest says {size}" if size is not None and now is not None and now != size
                   else "")]
    problems = [f"{tar}: {u}" for u in unsafe]
    if got != samples:
        problems.append(f"{tar}: {got} samples, manifest says {samples}")
    now = _file_size(tar)
    if size is not None and now is not None and now != size:
        problems.append(f"{tar}: {now} bytes, manifest says {size} (truncated or changed)")
    return problems


def ledger_problems(counts: dict) -> list[str]:
    """A finding per ledger level (whatever levels the job declared) that does not balance."""
    return [f"{level}: in={c['in']} != written={c['written']} + dropped={c['dropped_total']}"
            for level, c in counts.items() if not c["balanced"]]


def _tied_pairs(sorted_values: np.ndarray) -> int:
    """Pairs of equal values in a sorted array (sum of t(t-1)/2 over runs)."""
    if sorted_values.size == 0:
        return 0
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1], True])
    runs = np.diff(starts)
    return int((runs * (runs - 1) // 2).sum())


def _inversions(ranks: np.ndarray) -> int:
    """Pairs i < j with ranks[i] > ranks[j], by a bottom-up merge sort done with numpy sorts (O(n log^2 n)).

    At each level, every element of a right half counts the elements of its left half above it; then the
    halves are merged (sorting by (block, rank) keys) for the next level.
    """
    n = ranks.size
    span = int(ranks.max()) + 1 if n else 1
    a, idx, width, total = ranks.astype(np.int64), np.arange(n), 1, 0
    while width < n:
        block = idx // (2 * width)
        right = (idx // width) % 2 == 1
        keys = block * span + a
        left_keys = keys[~right]  # sorted: blocks ascending, each left half sorted
        block_end = np.searchsorted(left_keys, block[right] * span + span - 1, side="right")
        total += int((block_end - np.searchsorted(left_keys, keys[right], side="right")).sum())
        a = np.sort(keys) - block * span  # every block keeps its positions, now sorted within
        width *= 2
    return total


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b of two score vectors (ties counted as in scipy); NaN when either is constant.

    Knight's method, O(n log^2 n) with numpy: sort by (x, y); discordant pairs are then the inversions of
    y, and tau-b = (n0 - n1 - n2 + n3 - 2 D) / sqrt((n0 - n1)(n0 - n2)) with n1, n2 the pairs tied in x,
    in y and n3 in both. A whole corpus (millions of samples) takes seconds, not n^2 memory.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    n0 = n * (n - 1) // 2
    n1, n2 = _tied_pairs(x), _tied_pairs(np.sort(y))
    joint = np.r_[True, (x[1:] != x[:-1]) | (y[1:] != y[:-1]), True] if n else np.array([True])
    runs = np.diff(np.flatnonzero(joint))
    n3 = int((runs * (runs - 1) // 2).sum())
    discordant = _inversions(np.unique(y, return_inverse=True)[1].ravel()) if n else 0
    denom = np.sqrt(float(n0 - n1) * float(n0 - n2))
    return float((n0 - n1 - n2 + n3 - 2 * discordant) / denom) if denom > 0 else float("nan")


def reward_label(reward: dict) -> str:
    """``name vVERSION`` from a manifest's reward entry, marked when it only filters (``rank: false``)."""
    return f"{reward['name']} v{reward['version']}" + (" (filter only)" if reward.get("rank") is False else "")


def reward_agreement(scores: pl.DataFrame, rewards: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Kendall tau-b between every pair of rewards, within each prompt group, averaged over groups.

    ``scores``: one row per candidate, columns ``prompt_id`` and one per reward. Returns the matrix
    (column ``reward`` plus one column per reward) and the number of groups each mean is over (groups
    where either reward is constant have no tau and are left out).
    """
    k = len(rewards)
    sums, counts = np.zeros((k, k)), np.zeros((k, k), dtype=int)
    for (_pid,), g in scores.group_by(["prompt_id"], maintain_order=True):
        if g.height < 2:
            continue
        cols = [g[r].to_numpy().astype(float) for r in rewards]
        for a in range(k):
            for b in range(a, k):
                tau = kendall_tau_b(cols[a], cols[b])
                if np.isfinite(tau):
                    for i, j in ((a, b), (b, a)) if a != b else ((a, a),):
                        sums[i, j] += tau
                        counts[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    matrix = pl.DataFrame({"reward": rewards, **{r: mean[:, j] for j, r in enumerate(rewards)}})
    groups = pl.DataFrame({"reward": rewards, **{r: counts[:, j] for j, r in enumerate(rewards)}})
    return matrix, groups


@dataclass
class InspectReport:
    output_dir: str
    manifest: dict
    counts: pl.DataFrame
    drops: pl.DataFrame            # level, reason, stage, count (from dead_letter/*.jsonl)
    scores: pl.DataFrame           # one row per candidate: prompt_id, prompt, rank, phi, generator_id, <reward>...
    score_stats: pl.DataFrame      # reward, n, min, median, max
    agreement: pl.DataFrame        # reward x reward mean Kendall tau-b
    agreement_groups: pl.DataFrame
    samples: list[dict] = field(default_factory=list)  # first ranked samples: {"json": meta, "images": {name: bytes}}
    findings: list[str] = field(default_factory=list)
    verified: bool = False

    @property
    def rewards(self) -> list[str]:
        return [r["name"] for r in self.manifest["rewards"]]


def _counts_table(manifest: dict) -> pl.DataFrame:
    rows = [{"level": level, "in": c["in"], "written": c["written"], "dropped": c["dropped_total"],
             "balanced": c["balanced"]} for level, c in manifest["counts"].items()]  # the job's declared levels
    return pl.DataFrame(rows, schema={"level": pl.Utf8, "in": pl.Int64, "written": pl.Int64, "dropped": pl.Int64,
                                      "balanced": pl.Boolean})


_DROP_SCHEMA = {"level": pl.Utf8, "reason": pl.Utf8, "stage": pl.Utf8, "count": pl.UInt32}


def _drops_table(out: str, findings: list[str]) -> pl.DataFrame:
    fs, root = fsspec.core.url_to_fs(f"{out}/dead_letter")
    frames = []
    for path in sorted(fs.glob(f"{root}/*.jsonl")):
        try:
            text = fs.cat(path)
            if text.strip():
                frames.append(pl.read_ndjson(io.BytesIO(text)).select(
                    [pl.col(c).cast(pl.Utf8) if c in ("level", "reason", "stage") else pl.lit(None, pl.Utf8).alias(c)
                     for c in ("level", "reason", "stage")]))
        except Exception as exn:  # noqa: BLE001 - any unreadable file is a finding, not a crash
            findings.append(f"{path}: unreadable dead-letter file ({error_text(exn)})")
    if not frames:
        return pl.DataFrame(schema=_DROP_SCHEMA)
    return (pl.concat(frames).group_by(["level", "reason", "stage"]).agg(pl.len().alias("count"))
            .sort(["level", "count", "reason"], descending=[False, True, False]))


def _scores_table(shards: list[dict], rewards: list[str], findings: list[str]) -> pl.DataFrame:
    rows = []
    for s in shards:
        try:
            index = pl.read_parquet(s["ranked_index"])
        except Exception as exn:  # noqa: BLE001
            findings.append(f"{s['ranked_index']}: unreadable index ({error_text(exn)})")
            continue
        for r in index.iter_rows(named=True):
            for rank, (cid, gen, phi, sc) in enumerate(zip(r["candidate_ids"], r["generator_ids"], r["phi"],
                                                           json.loads(r["scores_json"])), start=1):
                rows.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "category": r["category"],
                             "candidate_id": cid, "generator_id": gen, "position": rank, "phi": phi,
                             **{name: sc.get(name) for name in rewards}})
    schema = {"prompt_id": pl.Utf8, "prompt": pl.Utf8, "category": pl.Utf8, "candidate_id": pl.Utf8,
              "generator_id": pl.Utf8, "position": pl.Int64, "phi": pl.Float64, **{n: pl.Float64 for n in rewards}}
    return pl.DataFrame(rows, schema=schema)


def _score_stats(scores: pl.DataFrame, rewards: list[str]) -> pl.DataFrame:
    rows = []
    for r in rewards:
        col = scores[r].drop_nulls()
        rows.append({"reward": r, "n": col.len(), "min": col.min(), "median": col.median(), "max": col.max()})
    return pl.DataFrame(rows, schema={"reward": pl.Utf8, "n": pl.Int64, "min": pl.Float64, "median": pl.Float64,
                                      "max": pl.Float64})


def _read_samples(shards: list[dict], samples: int, findings: list[str]) -> list[dict]:
    got: list[dict] = []
    for s in shards:
        if len(got) >= samples:
            break
        try:
            for raw in iter_tar_samples(s["ranked_tar"]):
                if len(got) >= samples:
                    break
                if "json" not in raw:
                    continue
                images = {k: v for k, v in raw.items() if k != "json" and k != "__key__"}
                got.append({"key": raw["__key__"], "json": json.loads(raw["json"]), "images": images})
        except FileNotFoundError:
            continue  # verify() reports it
        except _READ_ERRORS as exn:
            if not any(f.startswith(f"{s['ranked_tar']}:") for f in findings):
                findings.append(f"{s['ranked_tar']}: unreadable ({error_text(exn)})")
    return got


def collect_report(output_dir: str, samples: int | None = None, verify_shards: bool = True):
    """Read ``output_dir`` (a finished build, or a filter output: the manifest's ``job`` says) once:
    tables, the first ``samples`` samples (default: 2 ranked prompts; a filter's 12 kept samples), findings."""
    out = output_dir.rstrip("/")
    with fsspec.open(f"{out}/manifest.json", "r") as f:
        manifest = json.load(f)
    if manifest.get("job") == "filter":
        from .inspect_filter import collect_filter_report

        return collect_filter_report(out, manifest, 12 if samples is None else samples, verify_shards=verify_shards)
    samples = 2 if samples is None else samples
    shards = local_shards(out, manifest)
    rewards = [r["name"] for r in manifest["rewards"]]
    findings = verify(manifest, out) if verify_shards else []
    scores = _scores_table(shards, rewards, findings)
    agreement, agreement_groups = reward_agreement(scores, rewards)
    return InspectReport(
        output_dir=out, manifest=manifest, counts=_counts_table(manifest), drops=_drops_table(out, findings),
        scores=scores, score_stats=_score_stats(scores, rewards), agreement=agreement,
        agreement_groups=agreement_groups, samples=_read_samples(shards, samples, findings) if samples else [],
        findings=findings, verified=verify_shards)


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}"
    return str(v)


def format_table(df: pl.DataFrame, indent: str = "  ") -> list[str]:
    """A polars frame as fixed-width text lines (header + rows)."""
    cells = [list(df.columns)] + [[_num(v) for v in row] for row in df.iter_rows()]
    widths = [max(len(r[i]) for r in cells) for i in range(len(df.columns))]
    return [indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in cells]


def format_text(rep) -> str:
    if getattr(rep, "job", "build") == "filter":
        from .inspect_filter import format_filter_text

        return format_filter_text(rep)
    m = rep.manifest
    lines = [f"build output {rep.output_dir}  (synpref {m['synpref_version']}, aggregator {m['aggregator']})",
             "rewards: " + ", ".join(reward_label(r) for r in m["rewards"]),
             "generators: " + ", ".join(f"{g['id']} ({g['model']})" for g in m["generators"])]
    lines += level_lines(m["counts"])
    lines.append(f"shards: {len(m['shards'])} ranked + {len(m['shards'])} pairwise")
    for s in rep.samples:
        meta = s["json"]
        lines.append(f"  {meta['prompt']!r} [{meta['category']}]")
        for c in sorted(meta["candidates"], key=lambda c: c["rank"]):
            scores = ", ".join(f"{k}={v:.4g}" for k, v in c["scores"].items())
            lines.append(f"    rank {c['rank']} phi={c['phi']:.3f} {c['lineage']['generator_id']} "
                         f"seed={c['lineage']['seed']}: {scores}")
    lines += table_lines(rep, "scores per reward:",
                         "reward agreement (Kendall tau-b within each prompt, mean over prompts):")
    return "\n".join(lines)


def level_lines(counts: dict) -> list[str]:
    """One line per ledger level the job declared: in, written, dropped by reason."""
    lines = []
    for level, c in counts.items():
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(c["dropped"].items())) or "none"
        lines.append(f"{level:<11} in {c['in']:>6}  written {c['written']:>6}  dropped: {dropped}")
    return lines


def table_lines(rep, scores_title: str, agreement_title: str) -> list[str]:
    """The drops, scores and agreement tables, then the verdict on the folder (a build's or a filter's)."""
    lines = ["drops by reason (dead_letter/):"]
    lines += format_table(rep.drops) if rep.drops.height else ["  none"]
    lines += [scores_title, *format_table(rep.score_stats), agreement_title, *format_table(rep.agreement)]
    if rep.verified:
        lines.append("verify: OK, every shard re-read matches the manifest" if not rep.findings
                     else "verify: PROBLEMS\n  " + "\n  ".join(rep.findings))
    elif rep.findings:
        lines.append("PROBLEMS\n  " + "\n  ".join(rep.findings))
    return lines


def inspect_output(output_dir: str, samples: int | None = None, verify_shards: bool = True) -> str:
    return format_text(collect_report(output_dir, samples, verify_shards))
