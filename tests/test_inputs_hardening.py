"""Inputs that users give (issue 19, items 5, 6, 8 and 10): a 100-megapixel image decoded in bounded
memory, non-finite metadata dropped into ``problems``, region specs that hang, recurse or write
Infinity refused in one line, the whole-world box accepted, polygon areas warmed before threads
share them, and galleries that are empty or give a photo two positions reported."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps
from test_reference_gallery import errors, geotagged_jpeg, picture, rows

import clue2geo_sdk.inputs.image as image_mod
from clue2geo_sdk.cli import main
from clue2geo_sdk.errors import BundleFormatError, RegionError
from clue2geo_sdk.geo.region import Region
from clue2geo_sdk.inputs.image import load_image
from clue2geo_sdk.inputs.metadata.photo import read_metadata
from clue2geo_sdk.retrieval.photo_build import build_gallery
from clue2geo_sdk.retrieval.photo_writer import GalleryWriter
from clue2geo_sdk.retrieval.photos import DB, VECTORS, PhotoGallery
from clue2geo_sdk.retrieval.photos import GALLERY_MANIFEST_FILE as MANIFEST

# -- item 5: large images ----------------------------------------------------------------------------

MAKE_BIG = """
import sys
from PIL import Image
im = Image.new("RGB", (10000, 9980), (90, 140, 200))
im.save(sys.argv[1] + "/big.png")
im.save(sys.argv[1] + "/big.jpg", quality=90)
"""
# The peak resident memory of this process's own address space (VmHWM: not inherited from the parent
# through fork/exec, unlike getrusage's ru_maxrss).
MEASURE = """
import json, sys, warnings
warnings.simplefilter("ignore")
from clue2geo_sdk.inputs.image import load_image
img = load_image(sys.argv[1])
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"size": img.size, "original_size": getattr(img, "original_size", None), "sha256": img.sha256,
                  "peak_mb": hwm / 1024}))
"""


THREE_AT_ONCE = """
import json, sys, threading, warnings
warnings.simplefilter("ignore")
from clue2geo_sdk.inputs.image import load_image
sizes = []
threads = [threading.Thread(target=lambda: sizes.append(load_image(sys.argv[1]).size)) for _ in range(3)]
[t.start() for t in threads]
[t.join() for t in threads]
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"sizes": sizes, "peak_mb": hwm / 1024}))
"""


def test_a_99_megapixel_png_and_jpeg_decode_in_bounded_memory(tmp_path: Path) -> None:
    """Measured: the code before peaked at ~1,190 MB for either file (three full-size copies) and
    ~3,500 MB for three PNGs loaded by three threads; now a JPEG is scaled by libjpeg while decoding
    (~95 MB) and a PNG holds one full-size buffer (~490 MB), one at a time across threads."""
    subprocess.run([sys.executable, "-c", MAKE_BIG, str(tmp_path)], check=True)
    bounds = {"big.png": 800, "big.jpg": 300}
    for name, bound_mb in bounds.items():
        path = tmp_path / name
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], check=True, capture_output=True, text=True)
        got = json.loads(out.stdout)
        assert got["peak_mb"] < bound_mb, (name, got)
        assert got["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), name  # of the original bytes
        assert got["original_size"] == [10000, 9980], name
        assert got["size"] == [2500, 2495], name  # reduced by 4: 6.2 MP, far above any stage's need
    out = subprocess.run(
        [sys.executable, "-c", THREE_AT_ONCE, str(tmp_path / "big.png")], check=True, capture_output=True, text=True
    )
    got = json.loads(out.stdout)
    assert got["peak_mb"] < 1000 and got["sizes"] == [[2500, 2495]] * 3, got


def test_normal_photos_decode_exactly_as_before(photo: Path) -> None:
    """At or under WORK_MAX_PIXELS nothing changes: the pixels are Pillow's full decode."""
    img = load_image(photo)
    with Image.open(photo) as ref:
        expected = ImageOps.exif_transpose(ref).convert("RGB")
    assert img.original_size is None and img.size == expected.size
    assert img.image.tobytes() == expected.tobytes()
    assert image_mod.reduction_factor(6000, 4000) == 1  # a 24 MP camera: full size
    assert image_mod.reduction_factor(8000, 6000) == 2  # 48 MP phone mode: 12 MP
    assert image_mod.reduction_factor(40000, 2500) == 2  # a 100 MP panorama keeps its height above 1024


def _png(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _reference(data: bytes, factor: int) -> np.ndarray:
    """What the full-size path gives, box-reduced: the reduced path must show the same picture."""
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        rgb = image_mod._to_rgb(ImageOps.exif_transpose(full))
    return np.asarray(rgb.reduce(factor), dtype=np.float64)


def test_reduction_keeps_orientation_colour_and_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the threshold lowered, small images take the reduced path in every mode a camera or an
    editor writes: EXIF-rotated JPEG, palette with transparency, 16-bit grey, RGBA."""
    monkeypatch.setattr(image_mod, "WORK_MAX_PIXELS", 20_000)
    monkeypatch.setattr(image_mod, "WORK_MIN_SIDE", 16)
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, :200] = (220, 30, 30)  # left half red, right half blue, top band green
    arr[:, 200:] = (30, 30, 220)
    arr[:60] = (30, 200, 30)
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=ex.tobytes())
    pal = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.info["transparency"] = pal.getpixel((0, 0))  # the green band is transparent: white when flattened
    deep = Image.fromarray((np.arange(400, dtype=np.uint16)[None, :].repeat(300, 0) * 150).astype(np.uint16))
    rgba = Image.fromarray(np.dstack([arr, np.full((300, 400), 255, np.uint8)]), "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((400, 300)))
    cases = {
        "jpeg-rotated": buf.getvalue(),
        "palette": _png(pal, transparency=pal.info["transparency"]),
        "16-bit": _png(deep),
        "rgba": _png(rgba),
    }
    for name, data in cases.items():
        img = load_image(data, name=name)
        assert image_mod.reduction_factor(400, 300) == 4
        ref = _reference(data, 4)
        want = (75, 100) if name == "jpeg-rotated" else (100, 75)
        assert img.size == want and ref.shape[:2] == (want[1], want[0]), name
        assert img.original_size == ((300, 400) if name == "jpeg-rotated" else (400, 300)), name
        got = np.asarray(img.image, dtype=np.float64)
        assert np.abs(got - ref).mean() < 4, name  # the same picture (DCT scaling / alpha edges differ slightly)
        assert img.sha256 == hashlib.sha256(data).hexdigest()
    upright = np.asarray(load_image(cases["jpeg-rotated"]).image)
    # turned clockwise: the left (red) half on top, the right (blue) below, the top (green) band on the right
    assert upright[5, 5].argmax() == 0 and upright[70, 5].argmax() == 2 and upright[50, 70].argmax() == 1
    # an image given already decoded is reduced the same way, its digest still of the full pixels
    given = load_image(Image.fromarray(arr))
    assert given.size == (100, 75) and given.original_size == (400, 300)
    assert given.sha256 == hashlib.sha256(Image.fromarray(arr).tobytes()).hexdigest()


# -- item 6: non-finite metadata ------------------------------------------------------------------------


def _xmp_with_altitude(alt: str) -> bytes:
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:exif="http://ns.adobe.com/exif/1.0/" '
        f'exif:GPSLatitude="48,51.5N" exif:GPSLongitude="2,17.7E" exif:GPSAltitude="{alt}"/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


@pytest.mark.parametrize("alt", ["NaN", "inf", "-Infinity", "1e999", "1e999/1", "1e308/1e-308"])
def test_non_finite_xmp_altitude_is_dropped_into_problems(alt: str) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 20, 30)).save(buf, format="JPEG", xmp=_xmp_with_altitude(alt))
    meta = read_metadata(buf.getvalue())
    assert meta.xmp_position is not None and math.isclose(meta.xmp_position.lat, 48 + 51.5 / 60)
    assert meta.xmp_position.altitude_m is None
    assert any("GPSAltitude" in p and "not a finite number" in p for p in meta.problems), meta.problems
    json.dumps(meta.to_dict(), allow_nan=False)  # valid JSON: no NaN, no Infinity


# -- item 8: region specs -------------------------------------------------------------------------------


def test_the_whole_world_box_and_boxes_on_the_edges_are_accepted() -> None:
    world = Region.parse("bbox:-180,-90,180,90")
    lat = np.array([0.0, 89.9, -90.0, 45.0, -12.0])
    lon = np.array([0.0, 179.9, -180.0, 180.0, -179.5])
    assert world.contains(lat, lon).all()
    assert Region.parse(world.to_dict()) == world
    assert world.contains(*world.anchor())
    west_edge = Region.parse("bbox:-180,-10,-170,10")
    assert west_edge.contains(np.array([0.0, 0.0]), np.array([-180.0, -165.0])).tolist() == [True, False]
    east_edge = Region.parse("bbox:170,-10,180,10")
    assert east_edge.contains(np.array([0.0, 0.0]), np.array([180.0, 0.0])).tolist() == [True, False]
    with pytest.raises(RegionError, match="no width"):  # from 180 east to -180: the same meridian
        Region.parse("bbox:180,0,-180,10")


@pytest.mark.parametrize(
    "spec",
    ["circle:0,0,inf", "circle:0,0,nan", "circle:0,0,1e999", "circle:inf,0,10", "bbox:-10,0,10,inf", "bbox:nan,0,1,1"],
)
def test_non_finite_numbers_in_a_region_are_refused(spec: str) -> None:
    with pytest.raises(RegionError, match="not a finite number") as err:
        Region.parse(spec)
    assert spec in str(err.value) and "\n" not in str(err.value)


def test_non_finite_numbers_in_a_region_dict_are_refused() -> None:
    with pytest.raises(RegionError, match="radius .*not a finite number"):
        Region.parse({"kind": "circle", "lat": 0.0, "lon": 0.0, "radius_km": float("inf")})
    with pytest.raises(RegionError, match="not a finite number"):
        Region.circle(0, 0, "Infinity")  # type: ignore[arg-type]


def test_a_deeply_nested_geojson_is_refused_naming_the_file(tmp_path: Path) -> None:
    deep = tmp_path / "deep.geojson"
    deep.write_text('{"type": "Polygon", "coordinates": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(RegionError) as err:
        Region.parse(f"geojson:{deep}")
    message = str(err.value)
    assert str(deep) in message and "nested too deeply" in message and "\n" not in message


def test_a_fifo_given_as_geojson_is_refused_without_opening_it(tmp_path: Path) -> None:
    """A writer stands ready to feed the pipe valid GeoJSON the moment a reader opens it: the code
    before opened it, read the polygon and accepted it; now it is refused from ``stat`` alone."""
    fifo = tmp_path / "area.geojson"
    os.mkfifo(fifo)
    done = threading.Event()
    area = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}

    def writer() -> None:
        while not done.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads
            except OSError:
                time.sleep(0.01)
                continue
            os.set_blocking(fd, True)
            os.write(fd, json.dumps(area).encode())
            os.close(fd)
            return

    feeder = threading.Thread(target=writer, daemon=True)
    feeder.start()
    try:
        with pytest.raises(RegionError, match="named pipe") as err:
            Region.parse(f"geojson:{fifo}")
        assert str(fifo) in str(err.value)
    finally:
        done.set()
        feeder.join()


# -- item 10: polygon areas are warmed before threads share them ------------------------------------------


def test_a_polygon_area_is_prepared_and_used_once_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """GEOS builds a prepared geometry's index on its first query, unsafely across threads: the
    area must have had that first query before a Region exists for threads to share."""
    import shapely

    from clue2geo_sdk.geo import region as region_mod

    region_mod._shape.cache_clear()
    queried: list[object] = []
    real = shapely.intersects_xy

    def spy(geom: object, *args: object, **kw: object) -> object:
        queried.append(geom)
        return real(geom, *args, **kw)

    monkeypatch.setattr(shapely, "intersects_xy", spy)
    square = {"type": "Polygon", "coordinates": [[[30, 30], [31, 30], [31, 31], [30, 31], [30, 30]]]}
    area = Region.polygon(square)
    shape = region_mod._shape(area.geometry)  # the cached, shared object
    assert shapely.is_prepared(shape) and any(g is shape for g in queried)
    region_mod._shape.cache_clear()
    queried.clear()
    again = Region.parse(area.to_dict())  # a record's region, read back
    assert any(g is region_mod._shape(again.geometry) for g in queried)


# -- item 8: galleries ---------------------------------------------------------------------------------------


def test_a_gallery_of_photos_without_gps_is_refused_at_build(demo_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "nogps"
    src.mkdir()
    for i in range(2):
        picture(40 + i).save(src / f"n{i}.jpg", "JPEG")
    out = tmp_path / "g"
    res = CliRunner().invoke(main, ["gallery", "build", str(src), "--bundle", str(demo_bundle), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert (
        "no photo could be added" in res.output and str(out) in res.output and "2 without a GPS position" in res.output
    )
    assert not (out / MANIFEST).exists() and not (out / DB).exists() and not (out / VECTORS).exists()
    assert len(errors(out)) == 2  # why each photo was not added is kept
    with pytest.raises(BundleFormatError, match="not a photo gallery"):
        PhotoGallery(out)


def test_an_empty_gallery_is_refused_when_opened(demo_bundle: Path, tmp_path: Path) -> None:
    """An empty gallery as the code before wrote it ("0 photos", exit 0): refused by name on opening,
    not an AttributeError for every image at locate."""
    from conftest import FAST

    from clue2geo_sdk import Geolocator
    from clue2geo_sdk.bundle.manifest import Bundle

    out = tmp_path / "empty"
    tower = Bundle.open(demo_bundle, verify=False).component("gpsclip")
    dim = int(Bundle.open(demo_bundle, verify=False).params("gpsclip")["dim"])
    writer = GalleryWriter(out, dim=dim, image_sha256=tower.files["image"].sha256)
    writer.finish()
    writer.close()
    assert json.loads((out / MANIFEST).read_text())["count"] == 0
    with pytest.raises(BundleFormatError, match="holds no photos") as err:
        PhotoGallery(out)
    assert str(out) in str(err.value)
    with pytest.raises(BundleFormatError, match="holds no photos"):
        Geolocator.load(demo_bundle, device="cpu", verify=False, gallery=out, **FAST)


def test_a_photo_given_two_positions_keeps_the_first_and_the_conflict_is_reported(
    demo_bundle: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    picture(50).save(src / "a.jpg", "JPEG")
    (src / "a_copy.jpg").write_bytes((src / "a.jpg").read_bytes())  # the same photo under another name
    picture(51).save(src / "c.jpg", "JPEG")
    table = src / "refs.csv"
    table.write_text(
        "path,lat,lon\n"
        "a.jpg,1.0,1.0\n"
        "a.jpg,2.0,2.0\n"  # line 3: conflict
        "a.jpg,1.00000001,1.0\n"  # line 4: the same place (within 10 m): already there
        "a_copy.jpg,3.0,3.0\n"  # line 5: conflict (same bytes)
        "c.jpg,5.0,5.0\n"
    )
    out = tmp_path / "g"
    args = ["gallery", "build", str(table), "--bundle", str(demo_bundle), "--out", str(out), "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["added"], summary["already"], summary["conflicts"], summary["failed"]) == (2, 1, 2, 0)
    assert sorted((Path(r[1]).name, r[3], r[4]) for r in rows(out)) == [("a.jpg", 1.0, 1.0), ("c.jpg", 5.0, 5.0)]
    conflicts = {e["line"]: e["message"] for e in errors(out) if e["kind"] == "conflict"}
    assert set(conflicts) == {3, 5}
    assert "2.000000, 2.000000 conflicts with 1.000000, 1.000000" in conflicts[3]
    assert "CSV line 2" in conflicts[3] and "the first position is kept" in conflicts[3]
    assert "a_copy.jpg" in conflicts[5] and "3.000000, 3.000000" in conflicts[5]
    # a later build giving the stored photo another position: the gallery's row is kept
    later = src / "later.csv"
    later.write_text("c.jpg,9.0,9.0\n")
    summary2 = build_gallery(later, demo_bundle, out)
    assert (summary2.added, summary2.conflicts, summary2.count) == (0, 1, 2)
    last = errors(out)[-1]
    assert last["kind"] == "conflict" and "the gallery's row for" in last["message"]
    assert "5.000000, 5.000000" in last["message"] and "9.000000, 9.000000" in last["message"]
    res = CliRunner().invoke(main, ["gallery", "build", str(table), "--bundle", str(demo_bundle), "--out", str(out)])
    assert res.exit_code == 3 and "conflicting positions (first kept)" in res.output, res.output


def test_a_folder_photo_whose_gps_disagrees_with_its_gallery_row_is_a_conflict(
    demo_bundle: Path, tmp_path: Path
) -> None:
    src = tmp_path / "folder"
    src.mkdir()
    geotagged_jpeg(src / "p.jpg", 48.8584, 2.2945, seed=60)
    table = tmp_path / "first.csv"
    table.write_text(f"{src / 'p.jpg'},-33.8568,151.2153\n")  # the CSV said Sydney first
    out = tmp_path / "g"
    assert build_gallery(table, demo_bundle, out).added == 1
    summary = build_gallery(src, demo_bundle, out)  # the photo's own EXIF says Paris
    assert (summary.added, summary.already, summary.conflicts) == (0, 0, 1)
    assert rows(out)[0][3:5] == (-33.8568, 151.2153)
