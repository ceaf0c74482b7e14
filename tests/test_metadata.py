"""Photo metadata beside the prediction: EXIF GPS / time / camera and XMP GPS from JPEG, PNG, WebP,
TIFF and HEIC written by Pillow (pillow-heif) in the layouts real cameras use; malformed values named,
never raised; the prediction independent of the metadata; the distance between the two."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, PngImagePlugin
from PIL.TiffImagePlugin import IFDRational as R

from clue2geo_sdk.cli import main
from clue2geo_sdk.geo.distance import haversine_km
from clue2geo_sdk.inputs.image import load_image
from clue2geo_sdk.inputs.metadata.photo import read_metadata
from clue2geo_sdk.runs.batch import run_batch
from clue2geo_sdk.runs.formats import CSV_FIELDS, csv_row
from clue2geo_sdk.runs.journal import read_journal

# Layouts as the cameras write them: byte order, which IFD holds what, how the rationals are formed.
IPHONE = {  # big-endian; seconds as hundredths; offset and sub-seconds present; west longitude
    "endian": ">",
    "ifd0": {0x010F: "Apple", 0x0110: "iPhone 14 Pro", 0x0131: "16.5", 0x0132: "2023:06:30 07:05:03"},
    "exif": {0x9003: "2023:06:30 07:05:03", 0x9011: "-07:00", 0x9291: "512"},
    "gps": {
        1: "N",
        2: (R(37, 1), R(46, 1), R(3036, 100)),
        3: "W",
        4: (R(122, 1), R(25, 1), R(1074, 100)),
        5: b"\x00",
        6: R(1234, 100),
        7: (R(14, 1), R(5, 1), R(3, 1)),
        12: "K",
        29: "2023:06:30",
    },
    "lat": 37 + 46 / 60 + 30.36 / 3600,
    "lon": -(122 + 25 / 60 + 10.74 / 3600),
    "alt": 12.34,
    "when": "2023-06-30T07:05:03.512-07:00",
    "gps_utc": "2023-06-30T14:05:03Z",
}
CANON = {  # little-endian; GPSVersionID; no offset tag (the zone is unknown); below sea level
    "endian": "<",
    "ifd0": {0x010F: "Canon", 0x0110: "Canon EOS R5"},
    "exif": {0x9003: "2022:12:24 18:30:00"},
    "gps": {
        0: b"\x02\x03\x00\x00",
        1: "S",
        2: (R(33, 1), R(51, 1), R(5450, 100)),
        3: "E",
        4: (R(151, 1), R(12, 1), R(3600, 100)),
        5: b"\x01",
        6: R(15, 1),
        18: "WGS-84",
    },
    "lat": -(33 + 51 / 60 + 54.5 / 3600),
    "lon": 151 + 12 / 60 + 36 / 3600,
    "alt": -15.0,
    "when": "2022-12-24T18:30:00",
    "gps_utc": None,
}
PIXEL = {  # little-endian; minutes with the fraction, seconds 0/1 (as many Android phones write)
    "endian": "<",
    "ifd0": {0x010F: "Google", 0x0110: "Pixel 7"},
    "exif": {0x9003: "2024:03:01 09:15:42", 0x9011: "+01:00"},
    "gps": {1: "N", 2: (R(48, 1), R(51496, 1000), R(0, 1)), 3: "E", 4: (R(2, 1), R(17670, 1000), R(0, 1))},
    "lat": 48 + 51.496 / 60,
    "lon": 2 + 17.67 / 60,
    "alt": None,
    "when": "2024-03-01T09:15:42+01:00",
    "gps_utc": None,
}
LAYOUTS = {"iphone": IPHONE, "canon": CANON, "pixel": PIXEL}
FORMATS = ["JPEG", "PNG", "WEBP", "TIFF", "HEIF"]


def exif_block(layout: dict) -> bytes:
    ex = Image.Exif()
    ex.endian = layout["endian"]
    for tag, value in layout["ifd0"].items():
        ex[tag] = value
    ex[0x8769] = dict(layout["exif"])
    if layout.get("gps"):
        ex[0x8825] = dict(layout["gps"])
    return ex.tobytes()


def xmp_packet(lat: str, lon: str, *, element: bool = False) -> bytes:
    props = f"<exif:GPSLatitude>{lat}</exif:GPSLatitude><exif:GPSLongitude>{lon}</exif:GPSLongitude>" if element else ""
    attrs = "" if element else f' exif:GPSLatitude="{lat}" exif:GPSLongitude="{lon}"'
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:exif="http://ns.adobe.com/exif/1.0/"{attrs}>{props}</rdf:Description>'
        '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>'
    ).encode()


def photo_bytes(fmt: str, exif: bytes | None = None, xmp: bytes | None = None, size=(96, 64)) -> bytes:
    """A photo in ``fmt`` with the EXIF block and XMP packet stored the way that format stores them."""
    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    img = Image.new("RGB", size, (90, 140, 200))
    buf = io.BytesIO()
    kw: dict = {}
    if exif is not None:
        kw["exif"] = exif
    if fmt == "PNG" and xmp is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode(), zip=True)
        kw["pnginfo"] = info
    elif fmt == "TIFF" and xmp is not None:
        kw["tiffinfo"] = {700: xmp}
    elif xmp is not None:
        kw["xmp"] = xmp
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_camera_layouts_in_every_format(fmt: str, name: str) -> None:
    layout = LAYOUTS[name]
    data = photo_bytes(fmt, exif_block(layout))
    meta = read_metadata(data)
    assert meta.format == fmt
    assert meta.problems == (), meta.problems
    pos = meta.exif_position
    assert pos is not None and pos.source == "exif"
    assert pos.lat == pytest.approx(layout["lat"], abs=1e-9) and pos.lon == pytest.approx(layout["lon"], abs=1e-9)
    assert pos.altitude_m == (pytest.approx(layout["alt"]) if layout["alt"] is not None else None)
    assert meta.datetime_original == layout["when"]
    assert meta.gps_time_utc == layout["gps_utc"]
    assert (meta.make, meta.model) == (layout["ifd0"][0x010F], layout["ifd0"][0x0110])
    # the same bytes through the pipeline's loader: metadata is read from what was decoded
    assert read_metadata(load_image(data)) == meta


def test_xmp_gps_alone_and_a_disagreement_with_exif() -> None:
    xmp = xmp_packet("33,51.9S", "151,12.6E")
    for fmt in FORMATS:
        meta = read_metadata(photo_bytes(fmt, exif_block({**CANON, "gps": None}), xmp))
        assert meta.xmp and meta.exif_position is None, fmt
        assert meta.position is not None and meta.position.source == "xmp", fmt
        assert (meta.position.lat, meta.position.lon) == (pytest.approx(-33.865), pytest.approx(151.21)), fmt
    # simple child elements instead of attributes; DDD,MM,SSk form
    meta = read_metadata(photo_bytes("JPEG", xmp=xmp_packet("48,51,29.76N", "2,17,40.2E", element=True)))
    assert meta.position.lat == pytest.approx(48 + 51 / 60 + 29.76 / 3600)
    # EXIF says Sydney, XMP says Paris: both kept, EXIF is the position, the disagreement is named
    meta = read_metadata(photo_bytes("JPEG", exif_block(CANON), xmp_packet("48,51.496N", "2,17.67E")))
    assert meta.position.source == "exif" and meta.xmp_position.lat == pytest.approx(48.85827, abs=1e-5)
    assert any("disagree by" in p for p in meta.problems)


def _ifd_entry(block: bytes, ifd_offset: int, tag: int) -> tuple[int, int, int, int]:
    """(entry position, type, count, value-or-offset) of ``tag`` in the IFD at ``ifd_offset`` (TIFF offsets)."""
    e = "<" if block[:2] == b"II" else ">"
    (n,) = struct.unpack(e + "H", block[ifd_offset : ifd_offset + 2])
    for i in range(n):
        at = ifd_offset + 2 + 12 * i
        t, typ, count, value = struct.unpack(e + "HHLL", block[at : at + 12])
        if t == tag:
            return at, typ, count, value
    raise KeyError(tag)


def _broken(layout: dict, how: str) -> bytes:
    """A library-written EXIF block with its GPS IFD broken on purpose."""
    block = bytearray(exif_block(layout)[6:])  # the TIFF structure, without b"Exif\0\0"
    e = "<" if block[:2] == b"II" else ">"
    (ifd0,) = struct.unpack(e + "L", block[4:8])
    at, _, _, gps = _ifd_entry(block, ifd0, 0x8825)
    if how == "pointer":  # the GPS IFD offset points far past the block
        block[at + 8 : at + 12] = struct.pack(e + "L", 0x7FFF0000)
    elif how == "denominator":  # GPSLatitude's minutes over zero
        _, _, _, value_at = _ifd_entry(block, gps, 2)
        block[value_at + 12 : value_at + 16] = struct.pack(e + "L", 0)
    elif how == "ref":  # a hemisphere letter that is none
        ref_at, _, _, _ = _ifd_entry(block, gps, 1)
        block[ref_at + 8 : ref_at + 9] = b"X"
    elif how == "count":  # the GPS IFD claims more entries than the block holds
        block[gps : gps + 2] = struct.pack(e + "H", 900)
    return b"Exif\x00\x00" + bytes(block)


@pytest.mark.parametrize(
    "how, said",
    [
        ("pointer", "GPS IFD points to offset 2147418112, outside"),
        ("denominator", "GPS GPSLatitude: zero denominator"),
        ("ref", "GPS GPSLatitudeRef is 'X', not N or S"),
        ("count", "GPS IFD is truncated after"),
    ],
)
def test_broken_gps_ifd_is_named_never_raised(how: str, said: str) -> None:
    data = photo_bytes("JPEG", _broken(CANON, how))
    meta = read_metadata(data)
    if how == "count":  # the sound entries are still read, and the damage is named beside them
        assert meta.exif_position is not None and meta.exif_position.lat == pytest.approx(CANON["lat"])
    else:
        assert meta.exif_position is None
    assert any(said in p for p in meta.problems), meta.problems
    assert (meta.make, meta.datetime_original) == ("Canon", "2022-12-24T18:30:00")  # the rest is still read
    json.dumps(meta.to_dict())


def test_malformed_times_and_hostile_xmp() -> None:
    layout = {**PIXEL, "exif": {0x9003: "    :  :     :  :  ", 0x9011: "+2h"}}
    meta = read_metadata(photo_bytes("JPEG", exif_block(layout)))
    assert meta.datetime_original is None and meta.position is not None
    assert any("DateTimeOriginal is blank" in p for p in meta.problems)
    assert any("OffsetTimeOriginal '+2h'" in p for p in meta.problems)
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        b'<rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="&b;"/></rdf:RDF></x:xmpmeta>'
    )
    meta = read_metadata(photo_bytes("JPEG", xmp=laughs))
    assert meta.position is None and any("XMP packet not read" in p for p in meta.problems), meta.problems
    meta = read_metadata(photo_bytes("JPEG", xmp=xmp_packet("91,0.0N", "2,17.67Q")))
    assert meta.position is None and len(meta.problems) == 2


def test_no_metadata_and_inputs_without_bytes() -> None:
    for fmt in ("PNG", "BMP", "GIF"):
        meta = read_metadata(photo_bytes(fmt))
        assert (meta.format, meta.position, meta.problems) == (fmt, None, ())
    assert read_metadata(b"not an image at all").format is None
    no_bytes = read_metadata(load_image(Image.new("RGB", (32, 32))))
    assert no_bytes.format is None and "no file bytes" in no_bytes.problems[0]


def test_metadata_command(tmp_path: Path) -> None:
    (tmp_path / "a.heic").write_bytes(photo_bytes("HEIF", exif_block(IPHONE)))
    (tmp_path / "b.jpg").write_bytes(photo_bytes("JPEG", _broken(CANON, "denominator")))
    res = CliRunner().invoke(main, ["metadata", str(tmp_path / "a.heic"), str(tmp_path / "b.jpg"), str(tmp_path)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert rows[0]["position"]["lat"] == pytest.approx(IPHONE["lat"]) and rows[0]["model"] == "iPhone 14 Pro"
    assert rows[1]["position"] is None and rows[1]["problems"]
    assert "is a directory" in rows[2]["error"]


def test_metadata_beside_the_prediction_on_the_demo_bundle(geo, photo: Path, tmp_path: Path) -> None:
    """End to end: generated photos (the example's pixels with a camera's EXIF) through the pipeline."""
    pixels = Image.open(photo)
    folder = tmp_path / "evidence"
    folder.mkdir()
    for name, fmt, exif in (
        ("gps.jpg", "JPEG", exif_block(IPHONE)),
        ("gps.heic", "HEIF", exif_block(CANON)),
        ("broken.jpg", "JPEG", _broken(CANON, "pointer")),
    ):
        if fmt == "HEIF":
            from pillow_heif import register_heif_opener

            register_heif_opener()
        pixels.save(folder / name, format=fmt, exif=exif)
    # the prediction does not depend on the metadata: same pixels, same answer, with or without it
    plain = io.BytesIO()
    pixels.save(plain, format="JPEG")
    with_gps = (folder / "gps.jpg").read_bytes()
    a, b = geo.locate(plain.getvalue()), geo.locate(with_gps)
    assert (a.lat, a.lon, a.candidates) == (b.lat, b.lon, b.candidates)
    assert a.metadata["position"] is None and a.metadata_distance_km is None
    assert b.metadata["position"]["lat"] == pytest.approx(IPHONE["lat"])
    assert b.metadata_distance_km == pytest.approx(
        float(haversine_km(IPHONE["lat"], IPHONE["lon"], b.lat, b.lon)), abs=1e-3
    )
    # in a batch: every record carries it, and the CSV shows the photo's own position beside the prediction
    out = tmp_path / "results.csv"
    summary = run_batch(geo, sorted(folder.iterdir()), out, fmt="csv", on_notice=lambda m: None)
    assert summary.ok == 3
    recs = {Path(r["path"]).name: r for r in read_journal(out.with_name(out.name + ".records.jsonl")).records}
    heic = recs["gps.heic"]
    assert heic["metadata"]["format"] == "HEIF" and heic["metadata"]["position"]["lat"] == pytest.approx(CANON["lat"])
    assert heic["metadata_distance_km"] == pytest.approx(
        float(haversine_km(CANON["lat"], CANON["lon"], heic["lat"], heic["lon"])), abs=1e-3
    )
    broken = recs["broken.jpg"]
    assert broken["status"] == "ok" and broken["metadata_distance_km"] is None
    assert any("outside" in p for p in broken["metadata"]["problems"])
    row = csv_row(heic)
    assert row["metadata_lat"] == pytest.approx(CANON["lat"]) and row["metadata_source"] == "exif"
    assert set(row) == set(CSV_FIELDS) and "metadata_problems" in out.read_text().splitlines()[0]
