"""synpref.core: the bottom layer (registry, errors, files, progress, strict JSON); imports nothing of synpref."""

__version__ = "0.1.0"
