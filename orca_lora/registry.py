"""One way to fill a registry: `@register(name)` files the decorated object under `name` (timm's
`register_model` pattern), so entries are looked up in a dict, never chosen by if/elif chains."""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def registrar(table: dict[str, T]) -> Callable[[str], Callable[[T], T]]:
    """A `register(name)` decorator factory that stores into `table` and returns the object unchanged."""
    def register(name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            table[name] = item
            return item
        return add
    return register
