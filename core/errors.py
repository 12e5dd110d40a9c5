"""One-line errors: what a user sees instead of a traceback, and what a dead-letter record carries.

A user mistake is a ``UserError`` (exit 2); a failed run is reported by ``pipeline_failure`` (exit 1);
per-record failures become a ``one_line`` detail so reruns write the same bytes.
"""
from __future__ import annotations

import re
from typing import Any


class UserError(Exception):
    """A bad config or a missing file: reported as one line, without a traceback."""


def one_line(detail: Any, limit: int = 400) -> str:
    """``detail`` as one short line, without object addresses (they differ per run: same bytes on rerun)."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", " ".join(str(detail).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    msg = one_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def error_line(exc_info) -> str:
    """One readable line from Beam's failure tuple (type, repr, traceback lines) or an exception."""
    if isinstance(exc_info, BaseException):
        return one_line(error_text(exc_info), 300)
    exc_type, exc_repr, tb = (tuple(exc_info) + ("", "", ""))[:3]
    return one_line(tb[-1] if tb else f"{getattr(exc_type, '__name__', exc_type)}: {exc_repr}", 300)


def pipeline_failure(exc: BaseException) -> str:
    """One line from a failed Beam job: the step that failed and the innermost error.

    Runners wrap a worker's exception (with its whole chain) in their own; the last
    ``Type: message`` line of that text is the error that stopped the job.
    """
    text = str(exc)
    step = re.findall(r"\[while running '([^']+)'\]", text)
    text = re.sub(r"\s*\[while running '[^']+'\]", "", text)
    errors = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    line = errors[-1] if errors else f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[-1]}"
    parts = step[-1].split("/") if step else []
    where = parts[2] if len(parts) > 2 else (parts[-1] if parts else "")  # BuildPreferences/<Stage>/<Step>/...
    return (f"{where} failed: " if where else "") + one_line(line, 400)
