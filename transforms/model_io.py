"""Resolve model locations: hub ids and local paths pass through; remote URLs are copied locally once.

diffusers, transformers and open_clip load from local paths or hub ids, not from
gs:// or s3:// directly, so remote checkpoints are fetched with fsspec into a
cache directory keyed by the URL.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import fsspec

from ..core.fileio import looks_like_hub_id


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_copy(path: str, cache_dir: str = "") -> str:
    """Return a local path for ``path``; remote files or folders are downloaded once (atomic rename)."""
    if not is_remote(path):
        return path[len("file://"):] if path.startswith("file://") else path
    root = cache_dir or os.environ.get("SYNPREF_CACHE", os.path.join(tempfile.gettempdir(), "synpref-cache"))
    target = os.path.join(root, hashlib.sha256(path.encode()).hexdigest()[:16], os.path.basename(path.rstrip("/")))
    if os.path.exists(target):
        return target
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"model file or folder not found: {path}")
    tmp = f"{target}.partial-{os.getpid()}"
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if fs.isdir(fs_path):
        fs.get(fs_path.rstrip("/") + "/", tmp, recursive=True)
    else:
        fs.get(fs_path, tmp)
    os.replace(tmp, target)
    return target


def location_status(path: str) -> tuple[bool, str]:
    """(usable, what we know) for a model file, folder, URL or hub id, without loading anything.

    A hub id is looked up in the local Hugging Face cache: with ``HF_HUB_OFFLINE=1`` an uncached
    id cannot load, so it counts as missing; online it is downloaded when a worker loads it.
    """
    if looks_like_hub_id(path) or path.startswith("hf-hub:"):
        repo = path[len("hf-hub:"):] if path.startswith("hf-hub:") else path
        try:
            from huggingface_hub import snapshot_download

            return True, f"hub id, in the local cache ({snapshot_download(repo, local_files_only=True)})"
        except Exception:
            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
                return False, "hub id not in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
            return True, "hub id, not cached: downloaded when a worker loads it"
    if is_remote(path):
        fs, fs_path = fsspec.core.url_to_fs(path)
        return (True, "remote, exists") if fs.exists(fs_path) else (False, "does not exist")
    if os.path.exists(local_copy(path)):
        return True, "local, exists"
    return False, "does not exist (not a local path, and not a hub id 'org/name')"


def check_location(path: str, what: str) -> None:
    """Fail before a pipeline starts when a model file or folder is missing, naming it."""
    if not path:
        return
    ok, status = location_status(path)
    if not ok:
        raise FileNotFoundError(f"{what}: {path} {status}")


def set_torch_threads(n: int) -> None:
    """torch intra-op threads for this worker process; 0 leaves torch's default."""
    if n > 0:
        import torch

        torch.set_num_threads(n)


_loads_in_process = 0


def pick_device(requested: str) -> str:
    """``auto``: spread model copies over the visible GPUs, else ``cpu``; anything else as given.

    Each load in a process takes the next GPU after one chosen by the process id, so worker
    processes (and Beam's ``model_copies`` in a shared process) land on different GPUs.
    """
    global _loads_in_process
    if requested != "auto":
        return requested
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    index = (os.getpid() + _loads_in_process) % n
    _loads_in_process += 1
    return f"cuda:{index}" if n > 1 else "cuda"


_SMALL_FILE = 1 << 20  # configs, tokenizers, scheduler files: hashed by content; weights by size + mtime/etag


def json_digest(obj) -> str:
    """sha256 of canonical JSON: a stable fingerprint of a config-like value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_fingerprint(location: str, revision: str = "") -> str:
    """A hash of a model checkpoint's files, so weights replaced under the same path are noticed.

    Small files (configs, tokenizer, scheduler) are hashed by content, large ones by size and
    modification time (local) or checksum/etag (object stores). A hub id cannot be resolved offline:
    it is identified by id and revision only, so pin ``revision`` to a commit for exact resume.
    """
    if not location or looks_like_hub_id(location) or location.startswith("hf-hub:"):
        return json_digest({"hub": location, "revision": revision or "main"})
    try:
        fs, path = fsspec.core.url_to_fs(location[len("file://"):] if location.startswith("file://") else location)
        files = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    except (FileNotFoundError, OSError):
        return json_digest({"missing": location})
    entries = []
    for name, info in sorted(files.items()):
        rel = name[len(path):].lstrip("/") if name != path else ""
        size = info.get("size") or 0
        if size <= _SMALL_FILE:
            stamp = hashlib.sha256(fs.cat_file(name)).hexdigest()
        else:
            stamp = str(info.get("md5Hash") or info.get("ETag") or info.get("etag") or info.get("mtime")
                        or info.get("LastModified") or info.get("updated") or "")
        entries.append((rel, size, stamp))
    return json_digest({"files": entries, "revision": revision, "remote": is_remote(location)})
