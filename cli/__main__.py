"""``python -m synpref.cli``."""
import sys

from .main import main

sys.exit(main())
