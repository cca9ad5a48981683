"""Old names that still work: a module's ``__getattr__`` that warns and hands out the name's new home."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def deprecated_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for names that were renamed or moved.

    Args:
        module: the ``__name__`` of the module the old names belong to.
        moved: old name -> ``"package.module.new_name"`` (the same module when only the name changed).

    Returns:
        ``__getattr__(name)``: for an old name, a DeprecationWarning naming the new one, then its object;
        AttributeError for any other name.
    """

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new_module, _, new_name = moved[name].rpartition(".")
        warnings.warn(f"{module}.{name} is deprecated: use {moved[name]}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__
