"""Entry points the runtime CLI finds by name (group ``clue2geo.plugins``) so it never imports torch.

Importing this module imports the export stack, so a missing extra fails when the plugin is
loaded, where the runtime CLI turns it into a MissingExtraError naming the extra.
"""

from __future__ import annotations

from pathlib import Path

from ._onnx import EXTERNAL_DATA_ABOVE
from .bundle_builder import build_demo as _build
from .synth import build_synth as _synth


def build_demo(path: Path, *, seed: int = 0, overwrite: bool = False) -> None:
    _build(path, seed=seed, overwrite=overwrite)


def build_synth(
    path: Path,
    *,
    shape: str = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    external_data_above: int | None = None,
    workdir: Path | None = None,
) -> None:
    _synth(
        path,
        shape=shape,
        seed=seed,
        overwrite=overwrite,
        external_data_above=EXTERNAL_DATA_ABOVE if external_data_above is None else external_data_above,
        workdir=workdir,
    )
