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


class BundleExistsError(Clue2GeoError, FileExistsError):
    """A bundle would be written over files it does not own; the message names them and what to do."""


def install_hint(extra: str) -> str:
    """A command that brings an extra on both kinds of install: a source checkout (editable, pinned)
    and a package index. The README's install is the first, where ``pip install 'clue2geo[x]'`` alone
    would look for clue2geo on the index rather than the checkout."""
    return (
        f"pip install -c constraints.txt -e '.[{extra}]' in the clue2geo source folder "
        f"(or pip install 'clue2geo[{extra}]' where clue2geo comes from a package index)"
    )


class MissingExtraError(Clue2GeoError, ImportError):
    """An optional dependency is not installed; the message names a command that installs it:
    the extra that brings it, or ``install`` for a package that is no extra's (e.g. a core one)."""

    def __init__(self, module: str, extra: str | None, purpose: str, *, install: str | None = None) -> None:
        how = install or (install_hint(extra) if extra else f"pip install {module}")
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed. Install it with: {how}"
        )
        self.module = module
        self.extra = extra


class ExportValidationError(Clue2GeoError, RuntimeError):
    """An exported artifact does not reproduce its reference within the stated tolerance."""


class ImageLoadError(Clue2GeoError, ValueError):
    """An input image cannot be read or decoded; the message names the input and the reason."""


class RegionError(Clue2GeoError, ValueError):
    """A region the SDK cannot use: an unknown country code, a malformed box or radius, a bad polygon."""


class InvalidArgumentError(Clue2GeoError, TypeError, ValueError):
    """A public call got an argument of the wrong type or out of range (both builtins, so callers that
    caught the ``TypeError`` or ``ValueError`` raised before still catch it); the message names it."""


class OptionsError(InvalidArgumentError):
    """A pipeline option that is unknown, of the wrong type, out of range or not finite."""


class DeviceError(Clue2GeoError, RuntimeError):
    """The device asked for cannot be used (e.g. ``device="cuda"`` without onnxruntime's CUDA provider)."""


class InsufficientMemoryError(Clue2GeoError, MemoryError):
    """A load would need more memory than is free; refused before the OOM killer ends the process."""


class RecordFormatError(Clue2GeoError, ValueError):
    """A result record (e.g. a journal line given to ``Prediction.from_dict``) is not a prediction."""
