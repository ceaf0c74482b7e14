"""Turning model text into typed values, robustly: JSON, Python-style dicts, or loose text.

The paper's own examples use single-quoted dicts and string coordinates, so every parser here
accepts those; values that cannot be read become ``None``, never a default such as (0, 0).
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

import attrs

_NUM = r"[-+]?\d{1,3}(?:\.\d+)?"


def _balanced(text: str, open_ch: str, close_ch: str) -> str | None:
    start = text.find(open_ch)
    while start != -1:
        depth, in_str, quote = 0, False, ""
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if ch == "\\":
                    continue
                if ch == quote:
                    in_str = False
            elif ch in "\"'" and depth > 0 and text[i - 1] in "{[:, ":
                in_str, quote = True, ch
            elif ch == open_ch:
                depth += 1
            elif ch == close_ch:
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find(open_ch, start + 1)
    return None


def _json_lenient(s: str) -> Any:
    return json.loads(s, strict=False)  # models emit raw newlines inside strings


def extract_json(text: str, kind: type = dict) -> Any | None:
    """The first JSON (or Python-literal) object/array in ``text``; None when there is none."""
    open_ch, close_ch = ("{", "}") if kind is dict else ("[", "]")
    for candidate in (text.strip(), _balanced(text, open_ch, close_ch)):
        if not candidate:
            continue
        for loader in (_json_lenient, ast.literal_eval):
            try:
                value = loader(candidate)
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                continue
            if isinstance(value, kind):
                return value
    return None


def to_float(value: Any) -> float | None:
    """A finite float from a number or a numeric string (e.g. '43.8811'); None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        f = float(value)
    else:
        m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d+)?)\s*°?\s*([NSEWnsew])?\s*", str(value))
        if not m:
            return None
        f = float(m.group(1))
        if m.group(2) and m.group(2).upper() in "SW":
            f = -abs(f)
    return f if math.isfinite(f) else None


def valid_coordinate(lat: float | None, lon: float | None) -> bool:
    return lat is not None and lon is not None and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0


def _text(value: Any) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return None if s.lower() in ("", "null", "none", "unknown", "n/a") else s


@attrs.frozen(kw_only=True)
class LocationAnswer:
    """A parsed location answer; lat/lon are None when absent or out of range (``invalid`` says why)."""

    country: str | None = None
    city: str | None = None
    landmark: str | None = None
    lat: float | None = None
    lon: float | None = None
    reasons: str | None = None
    invalid: str | None = None

    @property
    def valid(self) -> bool:
        return self.invalid is None


def parse_location(text: str) -> LocationAnswer:
    obj = extract_json(text, dict)
    if obj is None:
        lat_m = re.search(r"lat(?:itude)?['\"]?\s*[:=]\s*['\"]?(" + _NUM + ")", text, re.I)
        lon_m = re.search(r"(?:lon|lng|longitude)['\"]?\s*[:=]\s*['\"]?(" + _NUM + ")", text, re.I)
        if not (lat_m and lon_m):
            return LocationAnswer(invalid="no JSON object and no lat/lon in the answer")
        obj = {"lat": lat_m.group(1), "lon": lon_m.group(1)}
    low = {str(k).lower(): v for k, v in obj.items()}
    lat = to_float(low.get("lat", low.get("latitude")))
    lon = to_float(low.get("lon", low.get("lng", low.get("longitude"))))
    invalid = None
    if lat is None or lon is None:
        invalid = "lat/lon missing or not numbers"
    elif not valid_coordinate(lat, lon):
        invalid = f"coordinate out of range: {lat}, {lon}"
    return LocationAnswer(
        country=_text(low.get("country")),
        city=_text(low.get("city")),
        landmark=_text(low.get("landmark")),
        lat=lat if invalid is None else None,
        lon=lon if invalid is None else None,
        reasons=_text(low.get("reasons", low.get("reason"))),
        invalid=invalid,
    )


def parse_cues(text: str) -> list[tuple[str, str]] | None:
    """A list of (cue, description) from JSON, or from figure 2's '(cue, description)' lines; None if neither."""
    arr = extract_json(text, list)
    if arr is not None:
        out = []
        for item in arr:
            if isinstance(item, dict):
                low = {str(k).lower(): v for k, v in item.items()}
                cue, desc = _text(low.get("cue")), _text(low.get("description")) or ""
                if cue or desc:
                    out.append((cue or desc[:40], desc))
            elif isinstance(item, list | tuple) and item:
                out.append((str(item[0]).strip(), str(item[1]).strip() if len(item) > 1 else ""))
            elif isinstance(item, str) and item.strip():
                out.append((item.strip(), ""))
        return out
    pairs = re.findall(r"\(\s*([^,()]+?)\s*,\s*([^()]+?)\s*\)", text)
    return [(c, d) for c, d in pairs] or None


def salvage_cues(text: str) -> list[tuple[str, str]]:
    """The complete cue objects of a list cut off mid-way (the token budget ran out): every
    balanced ``{...}`` after the opening bracket; the unfinished last one is dropped."""
    start = text.find("[")
    rest, objects = (text[start + 1 :] if start != -1 else ""), []
    while (obj := _balanced(rest, "{", "}")) is not None:
        objects.append(obj)
        rest = rest[rest.find(obj) + len(obj) :]
    return parse_cues("[" + ",".join(objects) + "]") or [] if objects else []
