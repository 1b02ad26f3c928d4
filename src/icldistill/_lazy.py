"""Lazy public names for the subpackages: ``from icldistill.scoring import score_queries`` works
without importing torch or transformers until a name is used.

Each subpackage's ``__init__`` maps its public names to the module that defines them (the way
transformers and peft keep ``import`` cheap); importing a light module such as
``icldistill.scoring.metrics`` therefore never pulls in the heavy ones beside it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports_by_module: Mapping[str, tuple[str, ...]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``; ``exports_by_module`` maps a module to its public names."""
    exports = {name: module for module, names in exports_by_module.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(set(exports) | {m for m in exports.values()})

    return __getattr__, __dir__
