"""One small registry of named factories, used for datasets, data specs, models, tasks, optimizers, loops and
the CLI's family commands (timm-style). Users register their own entries the same way:
`nnlab.models.register("mynet", MyConfig)`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError, did_you_mean


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    config: type | None  # dataclass holding this entry's options; its `name` field selects the entry
    help: str
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. a model's example spec for registry tests


class Registry:
    """Maps names to factories. `register` is a decorator; unknown names fail with close matches.
    `builtins` names modules that register entries, imported on the first look-up (as plugins are), so
    that a lower layer can look up an entry defined above it without importing it."""

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()):
        self.kind, self.builtins = kind, builtins
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type | None = None, **meta: Any) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, config, doc[0] if doc else "", meta)
            return fn

        return deco

    def _load(self) -> None:
        for module in self.builtins:
            importlib.import_module(module)
        self.builtins = ()

    def __getitem__(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise UserError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._entries)}; "
                f"available: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)


# Training loops: the supervised loop (supervised.py) serves every task-based family; others (RL) own theirs.
loops = Registry("loop", builtins=("nnlab.supervised", "nnlab.rl.loop"))
# Commands a family adds to the CLI (`nnlab generate RUN`): an entry's meta `arguments(parser)` adds its options, and
# either `tasks` names the tasks whose runs it takes (its factory: `(loaded model, args) -> exit code`) or `loops`
# the loops (`nnlab play RUN`; its factory: `(Run, args) -> exit code`).
commands = Registry("command", builtins=("nnlab.tasks", "nnlab.rl.loop"))
