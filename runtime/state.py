"""Per-request state that stays with its thread, so requests on one patched model never mix.

A server may share one model between request threads. Everything the hooks remember between the
stages of one request (the prefill's roles, keep sets, captured vision signals) is an attribute
declared with :class:`PerThread`: each thread reads and writes its own copy, and a value set in
one thread is never seen by another. A ``generate()`` call runs entirely in its caller's thread,
so one call's prefill and decode steps always see the same state.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


class PerThread:
    """A descriptor for an instance attribute that holds one value per thread.

    Args:
        factory: makes a thread's initial value the first time that thread reads the attribute
            (default: ``None``). Called once per thread and instance, so mutable defaults are safe.

    Example:
        >>> class Counter:
        ...     calls = PerThread(lambda: 0)
        >>> c = Counter(); c.calls += 1
        >>> import threading; seen = []
        >>> t = threading.Thread(target=lambda: seen.append(c.calls)); t.start(); t.join()
        >>> c.calls, seen
        (1, [0])
    """

    def __init__(self, factory: Callable[[], Any] = lambda: None) -> None:
        self.factory = factory
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @staticmethod
    def _local(obj: Any) -> threading.local:
        local = obj.__dict__.get("_per_thread")
        if local is None:  # dict.setdefault is atomic: two threads racing here get the same object
            local = obj.__dict__.setdefault("_per_thread", threading.local())
        return local

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        local = self._local(obj)
        try:
            return getattr(local, self.name)
        except AttributeError:
            value = self.factory()
            setattr(local, self.name, value)
            return value

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(self._local(obj), self.name, value)


class InstancePatch:
    """Installs an instance-attribute wrapper; ``remove()`` puts back what was there (same API as a hook handle)."""

    def __init__(self, owner: Any, name: str, wrapper: Any) -> None:
        self.owner, self.name, self.wrapper = owner, name, wrapper
        self._missing = object()
        self.previous = owner.__dict__.get(name, self._missing)  # another patch already there is put back
        setattr(owner, name, wrapper)

    def remove(self) -> None:
        if self.owner.__dict__.get(self.name) is not self.wrapper:
            return
        if self.previous is self._missing:
            del self.owner.__dict__[self.name]
        else:
            self.owner.__dict__[self.name] = self.previous
