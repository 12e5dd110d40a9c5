"""synpref.cli: the ``synpref`` command, the top layer: parse flags, call a pipeline, print, exit."""
from .main import main

__all__ = ["main"]
