"""Every error the SDK raises: one root, each also a builtin so callers can catch either."""

from __future__ import annotations


class Clue2GeoError(Exception):
    """Root of every clue2geo error."""


class BundleNotFoundError(Clue2GeoError, FileNotFoundError):
    """The bundle directory or its manifest does not exist."""


class BundleFormatError(Clue2GeoError, ValueError):
    """The manifest is malformed, too new, names an unknown role or a path outside the bundle."""


class BundleIntegrityError(Clue2GeoError, ValueError):
    """A component file is missing or its bytes do not match the manifest's digest."""


class MissingExtraError(Clue2GeoError, ImportError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed. "
            f"Install it with: pip install 'clue2geo[{extra}]'"
        )
        self.module = module
        self.extra = extra


class ExportValidationError(Clue2GeoError, RuntimeError):
    """An exported artifact does not reproduce its reference within the stated tolerance."""


class ImageLoadError(Clue2GeoError, ValueError):
    """An input image cannot be read or decoded; the message names the input and the reason."""
