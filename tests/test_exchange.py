"""``clue2geo export`` to the exchange formats (KML, KMZ, CASE/UCO JSON-LD), from a real run, read back
by independent readers: fastkml for KML, case_validate (SHACL against CASE 1.5.0) and rdflib for JSON-LD."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import rdflib
from click.testing import CliRunner
from conftest import EXAMPLE_IMAGES
from fastkml import kml
from PIL import Image

from clue2geo_sdk.cli import main
from clue2geo_sdk.evidence.kml import circle, kml_bytes
from clue2geo_sdk.geo.distance import haversine_km
from clue2geo_sdk.runs.batch import run_batch
from clue2geo_sdk.runs.records import Record

METADATA_POS = {"lat": 39.9999, "lon": 116.2755}
ALTERNATIVE = {"rank": 2, "lat": 10.5, "lon": -20.25, "score": 0.1, "confidence": 0.2, "members": [1]}
ALTERNATIVE |= {"sources": ["rag5"], "extent_km": 0.0, "country": None, "city": None, "references": 5}
LOCATION = "https://ontology.unifiedcyberontology.org/uco/location/"


@pytest.fixture(scope="module")
def journal(geo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run over the example images plus one broken file (a failed record), recording SHA3-512s
    too. One located record is given a second answer, an extent and a metadata position (the demo
    models give none of them)."""
    d = tmp_path_factory.mktemp("exchange")
    broken = d / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = d / "run.jsonl"
    images = sorted(p for p in EXAMPLE_IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
    summary = run_batch(geo, [*images, broken], out, hashes=("sha3-512",))
    assert (summary.ok, summary.error) == (len(images), 1)
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    rich = next(r for r in recs if r["status"] == "ok")
    rich["answers"] = [{**rich["answers"][0], "extent_km": 25.0}, ALTERNATIVE]
    rich["metadata"] = {**rich["metadata"], "position": METADATA_POS}
    edited = d / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return edited


def _records(journal: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]


def _export(journal: Path, dest: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(journal), "--to", str(dest)])
    assert res.exit_code == 0, res.output
    assert dest.is_file()


def _placemarks(doc: Any) -> list[Any]:
    return [p for folder in doc.features for p in folder.features]


def _read_kml(data: bytes) -> Any:
    return kml.KML.from_string(data).features[0]


def test_kml_reads_back_with_fastkml(journal: Path, tmp_path: Path) -> None:
    dest = tmp_path / "case.kml"
    _export(journal, dest)
    doc = _read_kml(dest.read_bytes())
    recs = _records(journal)
    ok = [r for r in recs if r["status"] == "ok"]
    assert "1 failed" in doc.description and "broken.jpg" in doc.description
    pms = _placemarks(doc)
    predictions = [p for p in pms if p.style_url.url == "#prediction"]
    assert [p.name for p in predictions] == [Path(r["path"]).name for r in ok]
    for p, r in zip(predictions, ok, strict=True):
        lon, lat, _ = p.geometry.coords[0]
        assert (lat, lon) == pytest.approx((r["lat"], r["lon"]), abs=1e-7)
        assert f"{r['confidence']:.4f}" in p.description and r["source"] in p.description
    rich = next(r for r in ok if len(r["answers"]) == 2)
    (alt,) = [p for p in pms if p.style_url.url == "#alternative"]
    assert alt.geometry.coords[0][:2] == pytest.approx((ALTERNATIVE["lon"], ALTERNATIVE["lat"]))
    assert Path(rich["path"]).name in alt.name
    circles = {p.name: p.geometry for p in pms if p.style_url.url == "#uncertainty"}
    ring = circles[f"{Path(rich['path']).name} (extent 25.0 km)"].exterior.coords
    assert len(ring) == 73 and ring[0] == ring[-1]
    meta = [p for p in pms if p.style_url.url == "#metadata"]
    assert [m.geometry.coords[0][:2] for m in meta] == [pytest.approx((METADATA_POS["lon"], METADATA_POS["lat"]))]
    (link,) = [p for p in pms if p.style_url.url == "#metadata-link"]
    assert link.geometry.coords[-1][:2] == pytest.approx((rich["lon"], rich["lat"]))


def test_circle_is_its_radius_from_the_centre() -> None:
    for lat, lon in ((0.0, 0.0), (60.0, 179.9), (-45.0, -120.0)):
        ring = circle(lat, lon, 25.0)
        assert all(haversine_km(lat, lon, a, b) == pytest.approx(25.0, rel=1e-6) for a, b in ring)
        assert all(-180.0 <= b <= 180.0 for _, b in ring)


def test_kmz_holds_doc_kml_and_a_thumbnail_per_located_image(journal: Path, tmp_path: Path) -> None:
    dest = tmp_path / "case.kmz"
    _export(journal, dest)
    ok = [r for r in _records(journal) if r["status"] == "ok"]
    with zipfile.ZipFile(dest) as z:
        names = z.namelist()
        assert names[0] == "doc.kml"
        assert sorted(n for n in names if n.startswith("files/")) == [f"files/{n}.jpg" for n in range(len(ok))]
        doc = _read_kml(z.read("doc.kml"))
        for n in range(len(ok)):
            with Image.open(io.BytesIO(z.read(f"files/{n}.jpg"))) as im:
                assert im.format == "JPEG" and max(im.size) <= 320
    predictions = [p for p in _placemarks(doc) if p.style_url.url == "#prediction"]
    assert [f'src="files/{n}.jpg"' in p.description for n, p in enumerate(predictions)] == [True] * len(ok)


def test_kmz_leaves_out_a_photo_that_changed(journal: Path, tmp_path: Path) -> None:
    recs = _records(journal)
    first = next(r for r in recs if r["status"] == "ok")
    first["image_sha256"] = "00" * 32  # the file on disk is no longer the one that was located
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    dest = tmp_path / "case.kmz"
    _export(changed, dest)
    with zipfile.ZipFile(dest) as z:
        assert "files/0.jpg" not in z.namelist()
        assert 'src="files/0.jpg"' not in z.read("doc.kml").decode("utf-8")


def test_the_run_records_sha3_512_of_each_input(journal: Path) -> None:
    """run_batch(hashes=("sha3-512",)) records, beside the sha256, hashlib's SHA3-512 of each file's bytes."""
    recs = _records(journal)
    assert len(recs) == len({r["path"] for r in recs}) >= 2
    for r in recs:
        data = Path(r["path"]).read_bytes()
        assert r["image_sha3_512"] == hashlib.sha3_512(data).hexdigest(), r["path"]
        assert r["image_sha256"] == hashlib.sha256(data).hexdigest(), r["path"]


def test_jsonld_conforms_to_case(journal: Path, tmp_path: Path) -> None:
    """Conforms to CASE 1.5.0 (case_validate), with each prediction, its ranked alternatives, the
    relationships from each File to its Locations, and both digests of each file."""
    dest = tmp_path / "case.jsonld"
    _export(journal, dest)
    validate = Path(sys.executable).with_name("case_validate")
    res = subprocess.run([str(validate), str(dest)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "Conforms: True" in res.stdout, res.stdout + res.stderr
    g = rdflib.Graph().parse(dest, format="json-ld")
    lat, lon = rdflib.URIRef(LOCATION + "latitude"), rdflib.URIRef(LOCATION + "longitude")
    got = sorted((float(g.value(f, lat)), float(g.value(f, lon))) for f in g.subjects(lat, None))
    ok = [r for r in _records(journal) if r["status"] == "ok"]
    assert got == sorted([(r["lat"], r["lon"]) for r in ok] + [(ALTERNATIVE["lat"], ALTERNATIVE["lon"])])
    doc = json.loads(dest.read_text(encoding="utf-8"))
    actions = [n for n in doc["@graph"] if n["@type"] == "case-investigation:InvestigativeAction"]
    assert len(actions) == 1  # one run
    assert len(actions[0]["uco-action:object"]) == len(ok) + 1 and len(actions[0]["uco-action:result"]) == len(ok) + 1
    hashes = {
        (n["uco-types:hashMethod"], n["uco-types:hashValue"]["@value"])
        for n in _nodes(doc)
        if n.get("@type") == "uco-types:Hash"
    }
    recs = _records(journal)
    assert hashes == {("SHA256", r["image_sha256"]) for r in recs} | {("SHA3-512", r["image_sha3_512"]) for r in recs}


def test_jsonld_ties_each_file_to_its_ranked_locations(journal: Path, tmp_path: Path) -> None:
    """Read back with rdflib: every Location of the action's results is the target of one directional
    Relationship from an input File; the record with a second answer has two, named rank 1 and 2 of 2."""
    dest = tmp_path / "case.jsonld"
    _export(journal, dest)
    g = rdflib.Graph().parse(dest, format="json-ld")
    core = rdflib.Namespace("https://ontology.unifiedcyberontology.org/uco/core/")
    action = rdflib.Namespace("https://ontology.unifiedcyberontology.org/uco/action/")
    files = set(g.objects(None, action.object))
    results = set(g.objects(None, action.result))
    rels = list(g.subjects(rdflib.RDF.type, core.Relationship))
    assert {g.value(r, core.target) for r in rels} == results and len(rels) == len(results)
    for r in rels:
        assert g.value(r, core.source) in files and g.value(r, core.isDirectional).toPython() is True
        assert str(g.value(r, core.kindOfRelationship)) == "Estimated_Depicted_Location"
    by_file: dict[Any, list[str]] = {}
    for r in rels:
        by_file.setdefault(g.value(r, core.source), []).append(str(g.value(g.value(r, core.target), core.name)))
    ok = [r for r in _records(journal) if r["status"] == "ok"]
    assert sorted(map(sorted, by_file.values())) == sorted(
        [["rank 1 of 1"]] * (len(ok) - 1) + [["rank 1 of 2", "rank 2 of 2"]]
    )
    (alt,) = [loc for loc in results if str(g.value(loc, core.name)) == "rank 2 of 2"]
    desc = str(g.value(alt, core.description))
    assert f"score {ALTERNATIVE['score']:.6f}" in desc and "sources rag5" in desc


def _nodes(value: Any) -> list[dict[str, Any]]:
    """Every JSON object in ``value``, nested ones included."""
    if isinstance(value, list):
        return [n for v in value for n in _nodes(v)]
    if isinstance(value, dict):
        return [value, *(n for v in value.values() for n in _nodes(v))]
    return []


def test_unknown_suffix_is_a_clear_error(journal: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["export", str(journal), "--to", str(tmp_path / "case.kmlx")])
    assert res.exit_code == 2
    assert "'.kmlx'" in res.output
    for known in (".kml", ".kmz", ".jsonld", ".geojson", ".csv", ".jsonl", ".html"):
        assert known in res.output
    assert not (tmp_path / "case.kmlx").exists()


def test_untrusted_text_stays_well_formed_xml(tmp_path: Path) -> None:
    """A hand-edited journal may hold control characters, lone surrogates and markup in any string."""
    rec = {"path": "a\x01<b>&.jpg", "status": "ok", "lat": 1.0, "lon": 2.0, "city": "x\ud800y</td>", "source": "\x00"}
    failed = {"path": "bad\x1f.jpg", "status": "error", "error": "E\ufffe<r>"}
    data = kml_bytes([Record.from_dict(rec, strict=False), Record.from_dict(failed, strict=False)])
    doc = kml.KML.from_string(data).features[0]
    (pm,) = _placemarks(doc)
    assert pm.name == "a<b>&.jpg" and "&lt;/td&gt;" in pm.description and "bad.jpg: E<r>" in doc.description
    assert "1 failed" in doc.description
