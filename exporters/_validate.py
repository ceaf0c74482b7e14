"""Reference-vs-exported comparison shared by every exporter (optimum-style validation)."""

from __future__ import annotations

import numpy as np

from clue2geo_sdk.errors import ExportValidationError


def check_close(name: str, reference: np.ndarray, exported: np.ndarray, *, atol: float) -> float:
    """Return the max absolute difference; raise ExportValidationError when it exceeds ``atol``."""
    reference = np.asarray(reference, dtype=np.float64)
    exported = np.asarray(exported, dtype=np.float64)
    if reference.shape != exported.shape:
        raise ExportValidationError(f"{name}: exported output shape {exported.shape} != reference {reference.shape}")
    diff = float(np.max(np.abs(reference - exported))) if reference.size else 0.0
    if not np.isfinite(diff) or diff > atol:
        raise ExportValidationError(f"{name}: max |reference - exported| = {diff:.3g} exceeds tolerance {atol:g}")
    return diff
