"""A position a photo claims for itself (EXIF or XMP), kept only when it is finite."""

from __future__ import annotations

import math
from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class Position:
    """A position a photo claims for itself, and which metadata block said so."""

    lat: float
    lon: float
    altitude_m: float | None
    source: str  # "exif" or "xmp"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def finite_position(pos: Position | None, problems: list[str]) -> Position | None:
    """The position with no NaN or infinity left in it (results are JSON, which has neither): a
    non-finite altitude is dropped, a non-finite coordinate drops the position; each is named."""
    if pos is None:
        return None
    if not (math.isfinite(pos.lat) and math.isfinite(pos.lon)):
        problems.append(f"{pos.source.upper()} position {pos.lat}, {pos.lon} is not finite; not used")
        return None
    if pos.altitude_m is not None and not math.isfinite(pos.altitude_m):
        problems.append(f"{pos.source.upper()} altitude {pos.altitude_m} is not finite; altitude not used")
        return attrs.evolve(pos, altitude_m=None)
    return pos
