"""Refuse command-line flags no Beam ``PipelineOptions`` class defines (``--num_prompts=3``, ``--tyop=1``):
Beam itself only warns and drops them, so a typo would silently run a different job."""
from __future__ import annotations

import importlib

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from .errors import RunRefused

# Runner modules that register options of their own when imported (Flink's --flink_master, Spark's...).
_RUNNER_OPTION_MODULES = ("apache_beam.runners.portability.flink_runner",
                          "apache_beam.runners.portability.spark_runner")


def _all_option_classes() -> list[type]:
    for name in _RUNNER_OPTION_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a runner that cannot load here has no flags to accept
            pass
    seen, todo = {}, list(PipelineOptions.__subclasses__())
    while todo:
        cls = todo.pop()
        seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
        todo += cls.__subclasses__()
    return list(seen.values())


def unknown_flags(flags: list[str]) -> list[str]:
    """The flags (and stray words) that no registered PipelineOptions class parses."""
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in _all_option_classes():
        try:
            cls._add_argparse_args(parser)  # noqa: SLF001 - the parser Beam itself builds in get_all_options
        except Exception:  # noqa: BLE001 - two classes defining one flag: the first definition wins
            pass
    _, unknown = parser.parse_known_args(list(flags))
    return unknown


def check_beam_flags(flags: list[str]) -> None:
    """Raise ``RunRefused`` naming the flags Beam does not define; Beam's and runners' own pass."""
    bad = unknown_flags(flags)
    if bad:
        hint = " (a config value is set with --set key=value)" if any(f.startswith("--") for f in bad) else ""
        raise RunRefused(f"unknown flag(s) {' '.join(bad)}: neither synpref nor Beam defines "
                         f"{'them' if len(bad) > 1 else 'it'}{hint}")
