"""The one exception for a user mistake found before work starts."""
from __future__ import annotations


class RunRefused(ValueError):
    """A bad flag, a busy or foreign output folder, a failed preflight: the CLI prints it as one line, exit 2.

    A ``ValueError`` so that callers catching configuration errors keep catching it.
    """
