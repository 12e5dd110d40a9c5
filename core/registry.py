"""One registry mechanism for every plug-in kind: rewards, generators, aggregators, corpus sources,
model families, exporters.

A registry maps the name a job config uses to the plug-in, refuses a name registered twice (two
plug-ins silently shadowing each other would change results without a word), and owns the one-line
error users see for a name it lacks.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")


class Registry(dict):
    """name -> plug-in, for one ``kind`` of plug-in (the word used in error messages)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, item: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self[name] = item
        return item

    def register(self, *names: str, attribute: Optional[str] = "name") -> Callable[[T], T]:
        """Class decorator: selectable by each of ``names``; sets ``cls.<attribute>`` to the first name
        (``attribute=None``: leave the class as it is)."""

        def wrap(cls: T) -> T:
            for name in names:
                self.add(name, cls)
            if attribute:
                setattr(cls, attribute, names[0])
            return cls

        return wrap

    def names(self) -> list[str]:
        return sorted(self)

    def lookup(self, name: str, where: str = ""):
        """The plug-in registered as ``name``; ValueError naming the choices otherwise (after ``where``,
        the config key that names it, when given)."""
        if name not in self:
            raise ValueError(f"{where + ': ' if where else ''}unknown {self.kind} {name!r}; "
                             f"available: {self.names()}")
        return self[name]

    def discover(self, package: str, path: Iterable[str], skip: Iterable[str] = ()) -> None:
        """Import every module of a plug-in folder, so a new plug-in is one new file with a register
        decorator: nothing to add by hand (modules in ``skip`` or starting with ``_`` are not plug-ins)."""
        skip = set(skip)
        for module in sorted(m.name for m in pkgutil.iter_modules(list(path))):
            if module not in skip and not module.startswith("_"):
                importlib.import_module(f"{package}.{module}")
