"""``clue2geo metadata``: what a photo's own EXIF / XMP says, without locating it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..errors import ImageLoadError
from ..inputs.image import read_image_file
from ..inputs.metadata.photo import read_metadata


@click.command("metadata")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def metadata_cmd(paths: tuple[Path, ...]) -> None:
    """Print what each photo's own EXIF / XMP says (position, capture time, camera, malformed values),
    one JSON object per line, without locating it."""
    for path in paths:
        try:
            row: dict[str, Any] = {"path": str(path), **read_metadata(read_image_file(path)).to_dict()}
        except ImageLoadError as exc:
            row = {"path": str(path), "error": str(exc)}
        click.echo(json.dumps(row, ensure_ascii=False))
