"""One writer per output folder, and only folders that are ours.

``locked_output`` holds ``_synpref.lock`` in the folder for a whole run: the owner's host, pid, start time
and command, created atomically (``os.open(O_CREAT | O_EXCL)`` on a local disk; a conditional create,
``pipe_file(mode="create")``, on stores whose fsspec filesystem makes it atomic: gcsfs's generation match,
s3fs's ``If-None-Match``). A second run is refused naming the owner; a lock left by a dead process on the
same host is taken over, with a log line. ``claim_folder`` lets a build or filter write only into an empty
folder or one a run of the same kind created: that run wrote ``.synpref-output.json`` before anything else.
See docs/output_folders.md.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..core import __version__
from .errors import RunRefused
from ..core.fileio import dumps_strict as dumps

log = logging.getLogger("synpref.runs")

LOCK_NAME = "_synpref.lock"
MARKER_NAME = ".synpref-output.json"
# fsspec protocols whose conditional create is atomic (local: O_EXCL; memory: one process; gcs: generation
# match; s3: If-None-Match). Elsewhere a lock cannot be made safe: refused unless --force-unlock.
ATOMIC_CREATE = {"file", "local", "memory", "gs", "gcs", "s3", "s3a"}
_OURS = (LOCK_NAME, LOCK_NAME + ".takeover", MARKER_NAME)


def require_location(location, what: str) -> str:
    """The location as a string; an empty or missing one is a config error (not ``./None`` or the cwd)."""
    if location is None or not str(location).strip() or str(location).strip() == "None":
        raise RunRefused(f"{what} is empty: set it to the folder to write (a path or a gs:// / s3:// URL)")
    return str(location).rstrip("/") or "/"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _protocols(fs) -> set[str]:
    p = fs.protocol
    return set(p) if isinstance(p, (tuple, list)) else {p}


def _create(fs, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; False if it does."""
    if isinstance(fs, LocalFileSystem):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def _read_owner(fs, path: str) -> dict[str, Any] | None:
    """The lock's owner; None if the lock is gone. A lock still being written is read again briefly."""
    for _ in range(20):
        try:
            text = fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except ValueError:
            time.sleep(0.05)
    return {"host": "?", "pid": -1, "started": "?", "command": "? (unreadable lock file)"}


def describe(owner: dict[str, Any]) -> str:
    return (f"{owner.get('command', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, "
            f"started {owner.get('started', '?')})")


def _stale(owner: dict[str, Any]) -> bool:
    pid = owner.get("pid")
    return owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not pid_alive(pid)


def _remove_if_same(fs, path: str, owner: dict[str, Any]) -> None:
    """Remove the lock if it still holds ``owner`` (serialised by a takeover file: two runs finding the same
    stale lock cannot both remove it, which would delete the winner's new lock)."""
    guard = path + ".takeover"
    if not _create(fs, guard, b""):
        time.sleep(0.2)  # another run is taking over; try again
        return
    try:
        if _read_owner(fs, path) == owner:
            fs.rm(path)
    finally:
        fs.rm(guard)


def acquire(location: str, command: str, force_unlock: bool = False) -> dict[str, Any]:
    """Take the folder's lock (creating the folder) and return the owner record written into it."""
    fs, root = fsspec.core.url_to_fs(location)
    path = f"{root.rstrip('/')}/{LOCK_NAME}"
    atomic = bool(_protocols(fs) & ATOMIC_CREATE)
    if not atomic and not force_unlock:
        raise RunRefused(f"{location}: this storage ({'/'.join(sorted(_protocols(fs)))}) offers no atomic create, "
                         "so synpref cannot lock it; make sure no other run writes there and pass --force-unlock")
    try:
        fs.makedirs(root, exist_ok=True)
    except OSError as e:
        raise RunRefused(f"cannot write to {location}: {e.strerror or e}") from None
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "token": uuid.uuid4().hex,
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "synpref_version": __version__}
    data = dumps(owner, indent=2, sort_keys=True).encode()
    for _ in range(50):
        try:
            if _create(fs, path, data):
                return owner
        except (PermissionError, NotADirectoryError, IsADirectoryError) as e:
            raise RunRefused(f"cannot write to {location}: {e.strerror or e}") from None
        held = _read_owner(fs, path)
        if held is None:
            continue  # released between our create and our read
        if force_unlock:
            log.warning("--force-unlock: removing the lock of %s on %s", describe(held), location)
            _remove_if_same(fs, path, held)
        elif _stale(held):
            log.warning("taking over the lock on %s left by %s: that process is gone", location, describe(held))
            _remove_if_same(fs, path, held)
        else:
            raise RunRefused(f"{location} is in use by {describe(held)}; wait for it to finish, or if it is "
                             f"gone, remove {LOCK_NAME} or rerun with --force-unlock")
    raise RunRefused(f"{location}: could not take the lock ({LOCK_NAME} keeps changing)")


def release(location: str, owner: dict[str, Any]) -> None:
    """Remove the lock if it is still ours (a --force-unlock elsewhere may have replaced it)."""
    fs, root = fsspec.core.url_to_fs(location)
    path = f"{root.rstrip('/')}/{LOCK_NAME}"
    try:
        if (_read_owner(fs, path) or {}).get("token") == owner["token"]:
            fs.rm(path)
    except OSError as e:  # never hide the run's own outcome behind a cleanup failure
        log.warning("could not remove %s/%s: %s", location, LOCK_NAME, e)


@contextmanager
def locked_output(location, command: str, force_unlock: bool = False, what: str = "output folder") -> Iterator[dict]:
    """``with locked_output(out, "synpref build"):`` one writer in ``out`` for the whole block."""
    location = require_location(location, what)
    fs, root = fsspec.core.url_to_fs(location)
    existed = fs.exists(root)
    owner = acquire(location, command, force_unlock)
    try:
        yield owner
    finally:
        release(location, owner)
        try:
            if not existed and fs.isdir(root) and not fs.ls(root, detail=False):
                fs.rmdir(root)  # a run refused before writing leaves no empty folder behind
        except OSError:
            pass


def claim_folder(location: str, kind: str) -> None:
    """Make ``location`` a synpref ``kind`` output, or refuse: it must be empty (but for our lock) or hold the
    marker of an earlier ``kind`` run. The marker is written first, before any output file."""
    fs, root = fsspec.core.url_to_fs(location)
    root = root.rstrip("/")
    marker = f"{root}/{MARKER_NAME}"
    if fs.exists(marker):
        try:
            found = json.loads(fs.cat_file(marker)).get("kind")
        except (ValueError, AttributeError):
            found = None
        if found != kind:
            raise RunRefused(f"{location} holds a synpref {found or 'unknown'} output, not {'an' if kind[0] in 'aeiou' else 'a'} {kind} output; "
                             f"choose an empty or new folder")
        return
    try:
        entries = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        entries = []
    others = sorted(e for e in entries if e not in _OURS and not e.startswith(".synpref-probe-"))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise RunRefused(f"{location} is not empty ({shown}) and not a synpref {kind} output (no {MARKER_NAME}); "
                         "choose an empty or new folder")
    fs.pipe_file(marker, dumps({"kind": kind, "synpref_version": __version__}, sort_keys=True).encode())


def is_ours(location: str, kind: str) -> bool:
    """Whether ``location`` carries the marker of a ``kind`` run (stale-file sweeps run only then)."""
    fs, root = fsspec.core.url_to_fs(location)
    try:
        return json.loads(fs.cat_file(f"{root.rstrip('/')}/{MARKER_NAME}")).get("kind") == kind
    except (FileNotFoundError, ValueError, AttributeError):
        return False
