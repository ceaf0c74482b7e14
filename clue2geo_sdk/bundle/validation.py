"""The bundle's validation on record, in the one line every report and run states.

``clue2geo validate`` writes ``validation.json``; ``bundle attach-validation`` puts it in the bundle as
the ``validation`` component (file key ``report``). This module only reads it back. The fields read
here are the contract with the writer (:mod:`clue2geo_sdk.evaluation.validation`)::

    {"format": "clue2geo-validation/1",
     "evalset": {"name": str, "n": int, ...},
     "bundle": {"models_digest": str, ...},       # Bundle.models_digest of the bundle it measured
     "accuracy": {"<km>": {"value": float, "low": float, "high": float}, ...},   # fractions, 95 % CI
     ...}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .manifest import Bundle

VALIDATION_FORMAT = "clue2geo-validation/1"
NO_VALIDATION = "no validation on record for this bundle"
HEADLINE_KM = ("25", "200", "750", "2500")


def read_validation(bundle: Bundle) -> dict[str, Any] | None:
    """The attached ``validation.json`` as a dict, ``None`` when the bundle carries none."""
    comp = bundle.components.get("validation")
    return None if comp is None else load_report(bundle.root / comp.files["report"].path)


def load_report(path: Path) -> dict[str, Any]:
    """A ``validation.json`` read and checked to give its headline; ValueError (naming it) otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != VALIDATION_FORMAT:
            raise ValueError(f"format is not {VALIDATION_FORMAT!r}")
        summary_line(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a validation report from 'clue2geo validate' ({exc})") from None
    return data


def headline(bundle: Bundle | None, options_digest: str | None = None) -> str:
    """The line "validated on SET (n = 120): 25 km 41 % [38–44], …" or :data:`NO_VALIDATION`; never raises (a
    report must render whatever the bundle holds), an unreadable validation is said to be one. With
    ``options_digest`` (the results'), a validation measured under other options says so."""
    if bundle is None:
        return NO_VALIDATION
    try:
        data = read_validation(bundle)
        if data is None:
            return NO_VALIDATION
        return summary_line(data) + _other_options(data, options_digest)
    except (OSError, ValueError) as exc:
        return f"the validation on record for this bundle cannot be read ({exc})"


def _other_options(data: dict[str, Any], options_digest: str | None) -> str:
    """A warning when the results were made under other pipeline options than the validation: its
    error rates are then those of another configuration (token budgets, ablations, references)."""
    measured = (data.get("reproducibility") or {}).get("options_digest")
    if options_digest is None or not isinstance(measured, str) or measured == options_digest:
        return ""
    return f"; measured under other options (digest {measured[:12]}…) than these results' ({options_digest[:12]}…)"


def summary_line(data: dict[str, Any]) -> str:
    """The headline of a validation report's dict (see the module docstring for its fields)."""
    acc = data["accuracy"]
    parts = []
    for km in HEADLINE_KM:
        if km in acc:
            a = acc[km]
            parts.append(f"{km} km {100 * a['value']:.0f} % [{100 * a['low']:.0f}–{100 * a['high']:.0f}]")
    evalset = data["evalset"]
    return f"validated on {evalset['name']} (n = {evalset['n']}): {', '.join(parts)} (95 % bootstrap intervals)"
