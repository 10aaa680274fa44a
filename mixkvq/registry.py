"""Registries: methods, tasks, graders and kernels are looked up by name, never by if-ladders.

An entry is either the object itself (registered with the `register` decorator where it is defined) or a
`"module:attr"` string, imported on first use (lm-eval's lazy registry): a registry of methods then names every
method without importing any of them, and a method's module is imported only by a run that uses it.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from mixkvq.errors import choice_error

T = TypeVar("T")


def resolve(target: str):
    """The object a `"module:attr"` string names (the attr may be dotted)."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"lazy registry entry {target!r} is not of the form 'module:attr'")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    def __init__(self, what: str, lazy: dict[str, str] | None = None):
        self.what = what
        self._entries: dict[str, T | str] = {}
        for name, target in (lazy or {}).items():
            self.register(name, target)

    def register(self, name: str, target: str | None = None) -> Callable[[T], T] | None:
        """`@registry.register(name)` on the object, or `registry.register(name, "module:attr")` (lazy)."""
        if name in self._entries:
            raise KeyError(f"{self.what} {name!r} is registered twice")
        if target is not None:
            self._entries[name] = target
            return None

        def add(obj: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise choice_error(self.what, name, self._entries)
        entry = self._entries[name]
        if isinstance(entry, str):  # first use of a lazy entry: import it once
            entry = self._entries[name] = resolve(entry)
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
