"""The report's look and its HTML vocabulary: the page style, the Content-Security-Policy, and the
small helpers every part uses to turn a record's values into escaped text.

A results file is untrusted input (hand-edited, or written by another tool): every value goes
through :func:`esc`, numbers that are not finite are shown as "—", and JSON shown on the page is
strict (:func:`json_text`), whatever a record holds.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...runs.records import is_finite_number

#: Nothing but inline style and ``data:`` images: a string that slipped past escaping cannot run or call out.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def finite(*values: Any) -> bool:
    """Whether every value is a finite number (not a bool)."""
    return all(map(is_finite_number, values))


def json_kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def list_field(value: Any, key: str) -> list[Any]:
    """``value``, the record's ``key``, as a list ([] when absent or null); another type is named as
    an error (a record read leniently holds whatever its line held)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"the record's {key!r} is a JSON {json_kind(value)}, not a list")
    return value


def object_field(value: Any, key: str) -> Mapping[str, Any]:
    """``value``, the record's ``key``, as an object ({} when absent or null); another type is named
    as an error."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"the record's {key!r} is a JSON {json_kind(value)}, not an object")
    return value


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float written as its name ("NaN", "Infinity"): JSON shown on
    the page stays JSON (the standard has no NaN), whatever a record holds."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any, **kw: Any) -> str:
    """Strict JSON text of ``value`` (never NaN or Infinity) for the page."""
    return json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False, default=str, **kw)


def esc(value: Any) -> str:
    """Escaped text; "—" for nothing."""
    return "—" if value is None or value == "" else html.escape(str(value), quote=True)


def num(value: Any, fmt: str = ".4f", unit: str = "") -> str:
    """A finite number formatted with ``fmt`` and ``unit``; "—" for anything else."""
    return f"{value:{fmt}}{unit}" if finite(value) else "—"


def km(value: Any) -> str:
    """A distance in km, one decimal."""
    return num(value, ".1f", " km")


def code(value: Any) -> str:
    """Escaped text in ``<code>``."""
    return f"<code>{esc(value)}</code>"


def table_rows(pairs: Sequence[tuple[str, str]]) -> str:
    """Key-value table rows; both sides are HTML already."""
    return "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in pairs)


STYLE = """
*{box-sizing:border-box}
body{font-family:sans-serif;margin:1em auto;max-width:1240px;padding:0 1em;color:#111;font-size:14px;overflow-wrap:anywhere}
h1{font-size:1.6em} h2{font-size:1.3em;border-bottom:2px solid #444;padding-bottom:.2em} h3{font-size:1.05em;break-after:avoid}
table.candidates :is(th,td):not(.text){white-space:nowrap}
table{border-collapse:collapse;margin:.5em 0;width:100%;table-layout:auto}
td,th{border:1px solid #ccc;padding:3px 5px;vertical-align:top;text-align:left;font-size:13px;overflow-wrap:anywhere}
table.kv th{width:16em;background:#f4f4f4;font-weight:normal}
code,pre{font-family:monospace;font-size:12px;overflow-wrap:anywhere;word-break:break-all}
pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;border:1px solid #ddd}
svg.world{width:100%;height:auto;display:block;border:1px solid #999}
svg.local{width:100%;height:auto;display:block;border:1px solid #999}
svg.photo{max-width:100%;height:auto;display:block;border:1px solid #999}
.top{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:1em;align-items:start}
figure{margin:0} figcaption{font-size:12px;color:#333}
.image{margin-top:2em} .failed h2{color:#a00}
.bad{color:#b00;font-weight:bold} .good{color:#060} .warn{color:#a60;font-weight:bold}
.notice{border:2px solid #b00;background:#fee;padding:.6em;font-weight:bold;overflow-wrap:anywhere}
h4{font-size:13px;margin:.6em 0 .2em}
.swatch{display:inline-block;width:1em;height:.8em;border:3px solid;vertical-align:middle;margin-right:.3em}
.custody{border:1px solid #888;padding:.4em .8em;background:#fafafa;margin-top:1em}
.legend span{margin-right:1em}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:.6em;font-weight:bold}
@page{size:A4;margin:12mm}
@media print{
  body{max-width:none;margin:0;padding:0;font-size:10pt}
  .image{break-before:page;margin-top:0}
  svg,table.kv,.custody,figure{break-inside:avoid}
  tr{break-inside:avoid}
  details>summary{list-style:none}
  details::details-content{content-visibility:visible;display:block}
  a{color:inherit;text-decoration:none}
  .banner,.notice{-webkit-print-color-adjust:exact;print-color-adjust:exact}
  svg{-webkit-print-color-adjust:exact;print-color-adjust:exact}
}
"""
