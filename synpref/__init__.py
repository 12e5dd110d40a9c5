"""synpref: synthetic ranked preference data (Syn-Pic) and RankDPO training for T2I models.

The package maps the top-level folders (setup.py); the version lives in ``synpref.core``.
"""
from synpref.core import __version__

__all__ = ["__version__"]
