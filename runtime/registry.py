"""Registries: names → entries of one kind (model families, scorers, pre-LLM stages, …).

A registry starts empty in the low module that defines its kind; each entry is one module that
registers itself by name when it is imported, and the package of that kind imports its members
explicitly, one line each (the PEFT ``register_peft_method`` / torchao handler pattern). So a
registry's names are defined exactly once, by the module that implements them, in the order the
package lists them; everything else (the recipe loader, the CLI's choices) asks the registry.

Example:
    >>> colours = Registry("colour")
    >>> @colours.register("red")
    ... def red(): return "#f00"
    >>> colours.names(), colours["red"]()
    (('red',), '#f00')
    >>> colours["blue"]
    Traceback (most recent call last):
    ...
    KeyError: "unknown colour 'blue'; choose one of red"
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator


class Registry(Mapping):
    """An insertion-ordered, read-only mapping of names to entries, filled by :meth:`register`.

    Args:
        kind: what an entry is, for messages ("scorer", "model family", …).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Add ``entry`` under ``name``; without ``entry``, a decorator that registers what it wraps.

        Raises:
            ValueError: ``name`` is taken (two modules claiming one name is a bug, not an override).
        """
        if entry is None:
            def wrap(obj: Any) -> Any:
                self.register(name, obj)
                return obj

            return wrap
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name, got {name!r}")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a throwaway entry)."""
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """Every name, in registration order."""
        return tuple(self._entries)

    def choices(self, names: Any = None) -> str:
        """``"a, b or c"``: the names (default: all), for messages."""
        names = list(self.names() if names is None else names)
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}" if names else "none"

    def __getitem__(self, name: str) -> Any:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # an unhashable value (e.g. a list read from a corrupt recipe) is no name
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

