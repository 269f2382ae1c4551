"""Modules imported when first used, not when this package is.

``cryptography`` adds about 10 MiB to every process that imports it (the AMM, each agent, each
client), and only a cluster with TLS, or ``amm certs``, uses it: a process on plain loopback
never does. The security modules name it through a ``Lazy`` stand-in; type checkers see the real
imports (``TYPE_CHECKING``).
"""

from __future__ import annotations

import importlib
from typing import Any


class Lazy:
    """Stands for module ``module`` (or its attribute ``attribute``) until an attribute of it
    is read: then imports it and hands the attribute over."""

    __slots__ = ("_attribute", "_module", "_target")

    def __init__(self, module: str, attribute: str = "") -> None:
        self._module = module
        self._attribute = attribute
        self._target: Any = None

    def __getattr__(self, name: str) -> Any:
        target = self._target
        if target is None:
            target = importlib.import_module(self._module)
            if self._attribute:
                target = getattr(target, self._attribute)
            self._target = target
        return getattr(target, name)

    def __repr__(self) -> str:
        return f"Lazy({self._module!r}, {self._attribute!r})"
