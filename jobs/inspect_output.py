"""``synpref inspect``: what a build wrote, re-read from disk and checked against its manifest."""
from __future__ import annotations

import json
import tarfile

import fsspec
import webdataset as wds

from synpref.transforms.imageio import check_member_name


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


def verify(manifest: dict) -> list[str]:
    """Problems found re-reading every shard (empty list = all good)."""
    problems = []
    for s in manifest["shards"]:
        for tar, expected in ((s["ranked_tar"], s["groups"]), (s["pairs_tar"], s["pairs"])):
            try:
                got, unsafe = scan_shard(tar)
            except (OSError, tarfile.TarError) as exn:
                problems.append(f"{tar}: unreadable: {exn}")
                continue
            problems += [f"{tar}: {u}" for u in unsafe]
            if got != expected:
                problems.append(f"{tar}: {got} samples, manifest says {expected}")
    for level, c in manifest["counts"].items():
        if not c["balanced"]:
            problems.append(f"{level}: in={c['in']} != written={c['written']} + dropped={c['dropped_total']}")
    return problems


def inspect_output(output_dir: str, samples: int = 2, verify_shards: bool = True) -> str:
    out = output_dir.rstrip("/")
    with fsspec.open(f"{out}/manifest.json", "r") as f:
        manifest = json.load(f)
    lines = [f"build output {out}  (synpref {manifest['synpref_version']}, aggregator {manifest['aggregator']})",
             "rewards: " + ", ".join(f"{r['name']} v{r['version']}" for r in manifest["rewards"]),
             "generators: " + ", ".join(f"{g['id']} ({g['model']})" for g in manifest["generators"])]
    for level in ("prompts", "candidates", "pairs"):
        c = manifest["counts"][level]
        dropped = ", ".join(f"{k}={v}" for k, v in sorted(c["dropped"].items())) or "none"
        lines.append(f"{level:<11} in {c['in']:>6}  written {c['written']:>6}  dropped: {dropped}")
    lines.append(f"shards: {len(manifest['shards'])} ranked + {len(manifest['shards'])} pairwise")
    if manifest["shards"] and samples:
        ds = wds.WebDataset(manifest["shards"][0]["ranked_tar"], shardshuffle=False, empty_check=False)
        for i, sample in enumerate(ds):
            if i >= samples:
                break
            meta = json.loads(sample["json"])
            lines.append(f"  {meta['prompt']!r} [{meta['category']}]")
            for c in meta["candidates"]:
                scores = ", ".join(f"{k}={v:.4g}" for k, v in c["scores"].items())
                lines.append(f"    rank {c['rank']} phi={c['phi']:.3f} {c['lineage']['generator_id']} "
                             f"seed={c['lineage']['seed']}: {scores}")
    if verify_shards:
        problems = verify(manifest)
        lines.append("verify: OK, every shard re-read matches the manifest" if not problems
                     else "verify: PROBLEMS\n  " + "\n  ".join(problems))
    return "\n".join(lines)
