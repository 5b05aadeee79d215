"""Registries of compression methods by name (codecs, selectors): a new method is one file and one line."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], kind: str, examples: str) -> Callable[[str], Callable[[T], T]]:
    """`@register(name)` for `table`: each class gets its `name` and must carry `examples` (what the
    registry-driven tests run it with, described by `examples`)."""
    def register(name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if name in table:
                raise ValueError(f"a {kind} named {name!r} is registered already ({table[name].__name__})")
            if not getattr(cls, "examples", None):
                raise ValueError(f"{kind} {name!r} needs `examples` ({examples}) for the registry-driven tests")
            cls.name = name
            table[name] = cls
            return cls

        return add

    return register
