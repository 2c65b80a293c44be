"""The error hierarchy. The CLI turns every ScannerError into one line on stderr and exit code 2."""

from __future__ import annotations

import sys


class ScannerError(Exception):
    """Base of every error a user can act on."""


class InputError(ScannerError):
    """Bad targets, port specs, flags or files."""


class CatalogError(InputError):
    """A catalog file or entry is invalid (names the file, the entry and the field)."""


class InventoryError(InputError):
    """An inventory, site file or ConfigMap is invalid (names the file and what is wrong)."""


class PrivilegeError(ScannerError):
    """The operation needs a privilege this process does not hold (root, CAP_NET_RAW, CAP_NET_ADMIN)."""


def warn(message: str) -> None:
    """One line on stderr for input the plan cannot follow fully (the run goes on)."""
    sys.stderr.write(f"portmesh: warning: {message}\n")
    sys.stderr.flush()
