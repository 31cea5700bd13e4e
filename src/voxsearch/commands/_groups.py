"""Command groups that other command modules extend (`train`, `eval`): discovery of their hooks."""

from __future__ import annotations

import importlib
import pkgutil


def extend_group(subparsers, hook: str, skip: str) -> None:
    """Call `hook(subparsers)` of every module in voxsearch.commands that defines it (except `skip`)."""
    from voxsearch import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        name = f"{commands.__name__}.{info.name}"
        if name == skip:
            continue
        module = importlib.import_module(name)
        register = getattr(module, hook, None)
        if callable(register):
            register(subparsers)
