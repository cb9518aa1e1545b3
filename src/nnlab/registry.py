"""One small registry of named factories, used for datasets, models and tasks (timm-style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError, did_you_mean


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    config: type | None  # dataclass holding this entry's options; its `name` field selects the entry
    help: str


class Registry:
    """Maps names to factories. `register` is a decorator; unknown names fail with close matches."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, config, doc[0] if doc else "")
            return fn

        return deco

    def __getitem__(self, name: str) -> Entry:
        if name not in self._entries:
            raise UserError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"available: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)
