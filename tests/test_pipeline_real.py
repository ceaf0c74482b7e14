"""The whole pipeline on the demo bundle with the real llama.cpp backend (random weights: the
answers are meaningless, the plumbing is what is checked)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clue2geo_sdk import Failure, Geolocator, Prediction
from clue2geo_sdk.geo.countries import countries
from clue2geo_sdk.pipeline.parsing import valid_coordinate


def test_locate_real_backend(geo: Geolocator, photo: Path) -> None:
    pred = geo.locate(photo)
    assert valid_coordinate(pred.lat, pred.lon)
    assert 0.0 <= pred.confidence <= 1.0
    assert pred.bundle == "demo" and len(pred.image_sha256) == 64
    assert pred.candidates and all(valid_coordinate(c.lat, c.lon) for c in pred.candidates)
    assert pred.invalid_candidates + len([c for c in pred.candidates if c.source != "gallery_nearest"]) == 4
    assert set(pred.raw_outputs) == {"cues", "direct", "rag5", "rag10", "rag15"}
    assert pred.timings["total"] > 0
    # the country is the border containing the point (this demo answer is at sea: none, not a neighbour's),
    # the city the nearest GeoNames place inside it (none at sea)
    assert pred.country_code == countries().code_at(pred.lat, pred.lon)
    assert (pred.country is None) == (pred.country_code is None)
    assert pred.city is None if pred.country_code is None else pred.city
    # round trips
    again = Prediction.from_dict(json.loads(pred.to_json()))
    assert again == pred
    feature = pred.to_geojson()
    assert feature["geometry"]["coordinates"] == [pred.lon, pred.lat]


def test_same_image_any_input_kind(geo: Geolocator, photo: Path) -> None:
    a = geo.locate(photo)
    b = geo.locate(photo.read_bytes())
    assert (a.lat, a.lon) == (b.lat, b.lon)  # deterministic at temperature 0
    c = geo.locate(np.asarray(Image.open(photo).convert("RGB")))
    d = geo.locate(Image.open(photo))
    assert c.image_sha256 == d.image_sha256


def test_locate_many_records_failures_and_goes_on(geo: Geolocator, photo: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_text("not a jpeg")
    out = geo.locate_many([tmp_path / "bad.jpg", photo, tmp_path / "missing.png"], stream=False)
    assert [type(r).__name__ for r in out] == ["Failure", "Prediction", "Failure"]
    assert isinstance(out[0], Failure) and "bad.jpg" in out[0].message and "not an image" in out[0].message


def test_no_network_during_locate(geo: Geolocator, photo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    assert isinstance(geo.locate(photo), Prediction)


def test_runtime_never_imports_torch(demo_bundle: Path, photo: Path) -> None:
    code = f"""
import sys
from clue2geo_sdk import Bundle, Geolocator
Bundle.open({str(demo_bundle)!r})
with Geolocator.load({str(demo_bundle)!r}, device="cpu", max_cue_tokens=32, max_answer_tokens=32) as g:
    g.locate({str(photo)!r})
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "exporters", "training", "open_clip"))
print("FORBIDDEN", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FORBIDDEN []" in out.stdout


def test_runtime_sources_import_nothing_forbidden() -> None:
    import ast

    root = Path(__file__).resolve().parents[1] / "clue2geo_sdk"
    forbidden = {
        "torch",
        "transformers",
        "peft",
        "optimum",
        "open_clip",
        "sentence_transformers",
        "exporters",
        "training",
    }
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for n in names:
                assert n.split(".")[0] not in forbidden, f"{path.name} imports {n}"


def test_cluemap_image_side_is_computed_while_the_cues_are_written(geo: Geolocator, photo: Path) -> None:
    """The patch embeddings are taken before the pipeline waits for the cues (their own lap), and
    the cluemap built from them is the one built from scratch after the cues."""
    from clue2geo_sdk.inputs.image import load_image  # only this test needs the loaded image
    from clue2geo_sdk.pipeline import stages  # nor the stage functions

    pred = geo.locate(photo)
    laps = list(pred.timings)
    assert laps.index("retrieval") < laps.index("cluemap_image") < laps.index("cues") < laps.index("cluemap")
    img = load_image(photo)
    cues = [(c.cue, c.description) for c in pred.cues]
    early = stages.patch_embeddings(img, clip=geo.clip, grid=geo.grid)
    kw = {"clip": geo.clip, "sbert": geo.sbert, "grid": geo.grid, "alpha": 0.5}
    assert stages.make_cluemap(img, cues, patch_emb=early, **kw) == stages.make_cluemap(img, cues, **kw)
    assert pred.cluemap == stages.make_cluemap(img, cues, **kw).to_dict()
