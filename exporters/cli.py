"""Entry points the runtime CLI finds by name (group ``clue2geo.plugins``) so it never imports torch."""

from __future__ import annotations

from pathlib import Path


def build_demo(path: Path, *, seed: int = 0, overwrite: bool = True) -> None:
    from .bundle_builder import build_demo as _build

    _build(path, seed=seed, overwrite=overwrite)
