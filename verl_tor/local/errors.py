"""The local backend's one error type, apart so that its submodules raise it without importing the package."""

from __future__ import annotations


class LocalBackendError(ValueError):
    """A run selects the local backend where it cannot work; the message names the setting and the fix."""
