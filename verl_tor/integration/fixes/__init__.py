"""verl bugs fixed at run time, each applied only when a probe shows the bug (``patches/`` holds the diffs).

Every fix has the same life cycle, kept here once (``RuntimeFix``): probe verl's *original* function for the bug,
wrap it, mark the wrapper (``__verl_tor__``, ``__wrapped_original__``) so applying twice is a no-op and the
original stays reachable, rebind the name in the target module and in the verl modules that bound it at import,
and revert (tests; reproducing the bug). A new fix is a probe, a wrapper and one ``RuntimeFix(...)`` line.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("verl_tor")

__all__ = ["RuntimeFix", "original_of"]


def original_of(function: Any) -> Any:
    """verl's own function behind a verl_tor wrapper (itself when not wrapped)."""
    return getattr(function, "__wrapped_original__", function)


@dataclass(frozen=True)
class RuntimeFix:
    """One verl bug fixed by wrapping one module-level function, only where ``is_bug_present`` says so."""

    target: str
    """The verl module that defines the function (``verl.utils.tensordict_utils``)."""
    name: str
    """The function's name in ``target``."""
    is_bug_present: Callable[[], bool]
    """Probe of verl's original function (it must look through a wrapper with ``original_of``); may raise when
    verl's function is neither the buggy nor the fixed form, rather than patch blindly."""
    wrap: Callable[[Callable], Callable]
    """``original -> fixed``: the fixed function (it may delegate to the original)."""
    importers: tuple[str, ...] = ()
    """verl modules that ``from target import name`` at import time: they hold the original under the same name."""
    what: str = ""
    """One line for the log: what the fix changes."""

    def module(self) -> Any:
        return importlib.import_module(self.target)

    def is_active(self) -> bool:
        return bool(getattr(getattr(self.module(), self.name), "__verl_tor__", False))

    def apply(self) -> bool:
        """Install the fix if the bug is present (idempotent). Returns whether the fix is active now."""
        module = self.module()
        current = getattr(module, self.name)
        if getattr(current, "__verl_tor__", False):
            return True
        if not self.is_bug_present():
            return False
        fixed = self.wrap(current)
        fixed.__verl_tor__ = True
        fixed.__wrapped_original__ = current
        self._rebind(current, fixed)
        logger.info("verl_tor: fixed %s.%s (%s)", self.target, self.name, self.what)
        return True

    def revert(self) -> None:
        """Restore verl's original function everywhere the fix put its wrapper (tests)."""
        current = getattr(self.module(), self.name)
        if getattr(current, "__verl_tor__", False):
            self._rebind(current, current.__wrapped_original__)

    def _rebind(self, old: Any, new: Any) -> None:
        setattr(self.module(), self.name, new)
        for importer_name in self.importers:
            importer = sys.modules.get(importer_name)
            if importer is not None and getattr(importer, self.name, None) is old:
                setattr(importer, self.name, new)
