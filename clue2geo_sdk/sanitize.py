"""Untrusted strings (model output, file names, metadata) cleaned where they leave the program."""

from __future__ import annotations

import unicodedata
from typing import Any

MAX_TEXT = 200
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def clean_text(value: Any, max_len: int = MAX_TEXT) -> str | None:
    """``value`` as text with control characters (Unicode category Cc, and line/paragraph
    separators) removed, whitespace collapsed and the length capped; None when nothing is left."""
    if value is None:
        return None
    kept = "".join(
        " " if ch in "\t\n\r\u2028\u2029\x85" else ch
        for ch in str(value)
        if ch in "\t\n\r\u2028\u2029\x85" or unicodedata.category(ch) != "Cc"
    )
    text = " ".join(kept.split())[:max_len].strip()
    return text or None


def csv_cell(value: Any) -> Any:
    """A spreadsheet-safe cell: text starting with = + - @, tab or CR gets a leading apostrophe so it
    is not run as a formula. Numbers (negative coordinates included) stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_PREFIXES):
        return "'" + value
    return value
