"""Region constraints (issue 11 part 3): real country borders, boxes and circles, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FAST

from clue2geo_sdk.errors import RegionError
from clue2geo_sdk.geo.countries import countries
from clue2geo_sdk.geo.distance import haversine_km
from clue2geo_sdk.geo.region import Region
from clue2geo_sdk.pipeline.stages import within_region

PARIS, LONDON = (48.8566, 2.3522), (51.5074, -0.1278)


def test_country_codes_follow_real_borders() -> None:
    c = countries()
    assert c.code_at(*PARIS) == "FR"  # Natural Earth marks France -99 in ISO_A2: the _EH column is used
    assert c.code_at(59.9139, 10.7522) == "NO"  # Oslo, the other -99
    assert c.code_at(52.52, 13.405) == "DE"
    # Either side of the Rhine at Strasbourg / Kehl, 4.5 km apart.
    assert c.code_at(48.5817, 7.7510) == "FR"
    assert c.code_at(48.5769, 7.8150) == "DE"
    assert c.code_at(0.0, -30.0) is None  # mid-Atlantic
    # GeoNames puts Stavanger 1.1 km off the 1:10m coastline: within the tolerance, it is Norway's.
    assert c.code_at(58.97005, 5.73332) == "NO" and Region.parse("NO").contains(58.97005, 5.73332)
    assert not Region.parse("NO").contains(58.97005, 5.0)  # 42 km out to sea


def test_parse_and_errors_name_the_input() -> None:
    assert Region.parse("fr, de").codes == ("DE", "FR")
    assert Region.parse(["IT"]).to_dict() == {"kind": "countries", "codes": ["IT"]}
    box = Region.parse("bbox:-5,41,10,51.5")
    assert (box.west, box.south, box.east, box.north) == (-5.0, 41.0, 10.0, 51.5)
    circ = Region.parse("circle:48.8566,2.3522,350")
    assert Region.parse(circ.to_dict()) == circ
    with pytest.raises(RegionError, match="'XX'"):
        Region.parse("FR,XX")
    with pytest.raises(RegionError, match="4 numbers"):
        Region.parse("bbox:1,2,3")
    with pytest.raises(RegionError, match="south 50.0 must be below north 40.0"):
        Region.bbox(0, 50, 10, 40)
    with pytest.raises(RegionError, match="latitude 91"):
        Region.circle(91, 0, 10)
    with pytest.raises(RegionError, match="radius must be > 0"):
        Region.parse("circle:0,0,0")
    with pytest.raises(RegionError, match="no width"):
        Region.parse("bbox:180,0,-180,10")
    with pytest.raises(RegionError, match="missing or bad field"):
        Region.parse({"kind": "circle", "lat": 1.0})
    assert "across the 180° meridian" in Region.bbox(170, -25, -170, -10).describe()


def test_membership_by_kind() -> None:
    lat = np.array([PARIS[0], LONDON[0], 52.52])
    lon = np.array([PARIS[1], LONDON[1], 13.405])
    assert Region.parse("FR").contains(lat, lon).tolist() == [True, False, False]
    assert Region.parse("FR,DE,GB").contains(lat, lon).tolist() == [True, True, True]
    # Paris-London is 343.5 km (haversine, R = 6371.0088): a 340 km circle misses London, 350 km holds it.
    d = float(haversine_km(*PARIS, *LONDON))
    assert 343 < d < 344
    assert Region.circle(*PARIS, 340).contains(lat, lon).tolist() == [True, False, False]
    assert Region.circle(*PARIS, 350).contains(lat, lon).tolist() == [True, True, False]
    # A box across the antimeridian: 170E .. 170W holds 179.9E and 179.9W, not 0.
    fiji = Region.bbox(170, -25, -170, -10)
    assert fiji.contains(np.array([-17, -17, -17]), np.array([179.9, -179.9, 0.0])).tolist() == [True, True, False]
    assert fiji.contains(*fiji.anchor()) and abs(fiji.anchor()[1]) == 180.0


def test_anchor_lies_inside_and_prompt_says_so() -> None:
    for spec in ("FR", "NO,SE", "circle:10,20,5"):
        r = Region.parse(spec)
        assert r.contains(*r.anchor()), spec
    prompt = "Look at it.\nOutput only JSON: {}"
    out = within_region(prompt, Region.parse("FR"))
    assert (
        out
        == "Look at it.\nThe photo is known to have been taken in France (FR); answer with a location there.\nOutput only JSON: {}"
    )
    assert within_region(prompt, None) == prompt


def _in_region(region: Region, lat: float, lon: float) -> bool:
    return bool(region.contains(np.array([lat]), np.array([lon]))[0])


def test_locate_inside_a_region_the_demo_would_not_answer(geo, photo) -> None:  # noqa: ANN001
    from clue2geo_sdk.options import Options

    free = geo.locate(photo, options=Options(**FAST))
    # A 400 km circle around Reykjavik: the demo's random model answers elsewhere.
    region = Region.circle(64.1466, -21.9426, 400)
    assert not _in_region(region, free.lat, free.lon)
    pred = geo.locate(photo, options=Options(**FAST, region=region))
    assert _in_region(region, pred.lat, pred.lon)
    assert all(_in_region(region, c.lat, c.lon) for c in pred.candidates)
    assert pred.region == region.to_dict() and pred.options["region"] == region.to_dict()
    proposals = 4  # direct + rag5/10/15
    assert (
        pred.outside_region + pred.invalid_candidates + sum(c.source != "gallery_nearest" for c in pred.candidates)
        == proposals
    )
    assert pred.outside_region > 0
    if pred.fallback:
        assert pred.source == "gallery_nearest"
    # The references came from inside the region only.
    keys = geo._keys_in(region)
    assert len(keys) and region.contains(geo.gallery.lat[keys], geo.gallery.lon[keys]).all()
    for raw in pred.raw_outputs.get("rag5", []):
        assert isinstance(raw["text"], str)


def test_region_with_no_gallery_point_falls_back_to_its_anchor(geo, photo) -> None:  # noqa: ANN001
    from clue2geo_sdk.options import Options

    region = Region.circle(-45.0, -140.0, 30)  # open South Pacific
    assert not len(geo._keys_in(region))
    pred = geo.locate(photo, options=Options(**FAST, region=region))
    assert pred.fallback and (pred.source, pred.lat, pred.lon) == ("region_anchor", -45.0, -140.0)
    assert set(pred.raw_outputs) == {"cues", "direct"}  # no references to show: no RAG prompts
    assert pred.confidence is None and pred.answers[0].confidence is None  # nothing was weighed
    # at sea: no border contains it, and no city 2,000 km away is named either
    assert pred.country_code is None and pred.country is None and pred.city is None


def test_cli_region_is_recorded_and_bad_region_named(demo_bundle, photo, tmp_path) -> None:  # noqa: ANN001
    from click.testing import CliRunner

    from clue2geo_sdk.cli import main

    out = tmp_path / "r.jsonl"
    args = ["locate", str(photo), "--bundle", str(demo_bundle), "--out", str(out), "--no-verify"]
    args += ["--max-cue-tokens", "96", "--max-answer-tokens", "48"]
    bad = CliRunner().invoke(main, [*args, "--region", "FR,ZZ"])
    assert bad.exit_code == 1 and "'ZZ'" in bad.output
    res = CliRunner().invoke(main, [*args, "--region", "IS"])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text().splitlines()[-1])
    assert rec["region"] == {"kind": "countries", "codes": ["IS"]}
    assert _in_region(Region.parse("IS"), rec["lat"], rec["lon"]) and rec["country_code"] == "IS"


def _geojson(path, *features) -> str:  # noqa: ANN001
    doc = {
        "type": "FeatureCollection",
        "features": [{"type": "Feature", "properties": {}, "geometry": g} for g in features],
    }
    path.write_text(json.dumps(doc))
    return str(path)


# An L: the box 0..10 x 0..10 less its upper-right 8 x 8, in GeoJSON's (lon, lat) order.
ELL = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 2], [2, 2], [2, 10], [0, 10], [0, 0]]]}


def test_a_geojson_area_is_its_polygon_not_its_box(tmp_path) -> None:  # noqa: ANN001
    spot = {"type": "Point", "coordinates": [50, 50]}  # other features in the file are ignored
    area = Region.parse("geojson:" + _geojson(tmp_path / "search-area.geojson", ELL, spot))
    assert (area.kind, area.name) == ("polygon", "search-area")
    # (lat, lon): both arms, the notch (inside the box, outside the L), an edge, and beyond the box
    lat = np.array([1.0, 5.0, 5.0, 0.0, -1.0, 9.9])
    lon = np.array([5.0, 1.0, 5.0, 5.0, 5.0, 1.9])
    assert area.contains(lat, lon).tolist() == [True, True, False, True, False, True]
    assert area.contains(*area.anchor())
    assert Region.parse(area.to_dict()) == area and hash(Region.parse(area.to_dict())) == hash(area)
    import shapely.geometry

    assert shapely.geometry.shape(area.to_dict()["geometry"]).equals(shapely.geometry.shape(ELL))
    assert "'search-area'" in area.describe() and "latitude 0.0000 and 10.0000" in area.describe()
    far = {"type": "Polygon", "coordinates": [[[20, 20], [21, 20], [21, 21], [20, 20]]]}
    both = Region.polygon(
        {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": g} for g in (ELL, far)]}
    )
    assert both.contains(np.array([1.0, 20.2, 5.0]), np.array([5.0, 20.8, 5.0])).tolist() == [True, True, False]


def test_adjacent_districts_make_one_area(tmp_path) -> None:  # noqa: ANN001
    """Two unit squares sharing an edge, and a third overlapping the second, as a GIS exports
    neighbouring districts: one area, the union (an invalid MultiPolygon if simply concatenated)."""
    squares = [
        {"type": "Polygon", "coordinates": [[[x, 0], [x + 1, 0], [x + 1, 1], [x, 1], [x, 0]]]} for x in (0, 1, 1.5)
    ]
    area = Region.parse("geojson:" + _geojson(tmp_path / "districts.geojson", *squares))
    lat = np.array([0.5, 0.5, 0.5, 0.5, 1.5])
    lon = np.array([0.5, 1.0, 2.2, 2.6, 0.5])
    assert area.contains(lat, lon).tolist() == [True, True, True, False, False]
    assert Region.parse(area.to_dict()) == area


def test_areas_reload_as_the_same_region(tmp_path) -> None:  # noqa: ANN001
    """A record's region must parse back to an equal Region (same options digest, so --resume and a
    record's own options agree): disjoint parts, holes, altitudes, a band along the map's edge."""
    from clue2geo_sdk.options import Options

    ring = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    hole = [[1, 1], [1, 2], [2, 2], [2, 1], [1, 1]]
    shapes = {
        "disjoint": [
            {"type": "Polygon", "coordinates": [ring]},
            ELL | {"coordinates": [[[x + 20, y] for x, y in ELL["coordinates"][0]]]},
        ],
        "holes": [
            {"type": "Polygon", "coordinates": [ring, hole]},
            {"type": "Polygon", "coordinates": [[[x + 10, y] for x, y in ring], [[x + 10, y] for x, y in hole]]},
        ],
        "altitudes": [{"type": "Polygon", "coordinates": [[[x, y, 120.5] for x, y in ring]]}],
        "band": [{"type": "Polygon", "coordinates": [[[-180, 0], [180, 0], [180, 10], [-180, 10], [-180, 0]]]}],
    }
    for name, parts in shapes.items():
        area = Region.parse("geojson:" + _geojson(tmp_path / f"{name}.geojson", *parts))
        again = Region.parse(area.to_dict())
        assert again == area and hash(again) == hash(area), name
        opts = Options(region=area)
        assert Options(**opts.to_dict()).digest() == opts.digest(), name
    holes = Region.parse("geojson:" + str(tmp_path / "holes.geojson"))
    lat, lon = np.array([0.5, 1.5, 1.5, 0.5]), np.array([0.5, 1.5, 11.5, 10.5])  # the holes are out
    assert holes.contains(lat, lon).tolist() == [True, False, False, True]
    band = Region.parse("geojson:" + str(tmp_path / "band.geojson"))
    assert band.contains(np.array([5.0, 5.0, 15.0]), np.array([179.0, -179.0, 0.0])).tolist() == [True, True, False]


def test_a_bad_geojson_area_is_named(tmp_path) -> None:  # noqa: ANN001
    def refused(spec: str, why: str) -> None:
        with pytest.raises(RegionError, match=why) as err:
            Region.parse(spec)
        assert spec.partition(":")[2] in str(err.value)

    refused(f"geojson:{tmp_path / 'nowhere.geojson'}", "no such file")
    (tmp_path / "notes.geojson").write_text("{not json")
    refused(f"geojson:{tmp_path / 'notes.geojson'}", "not readable GeoJSON")
    refused("geojson:" + _geojson(tmp_path / "pt.geojson", {"type": "Point", "coordinates": [1, 2]}), "no Polygon")
    metres = {
        "type": "Polygon",
        "coordinates": [[[261848, 6250566], [270000, 6250566], [270000, 6260000], [261848, 6250566]]],
    }
    refused("geojson:" + _geojson(tmp_path / "m.geojson", metres), "WGS84 degrees")
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]]}
    refused("geojson:" + _geojson(tmp_path / "bowtie.geojson", bowtie), "Self-intersection")
    ring = [[np.cos(t) * 10, np.sin(t) * 10] for t in np.linspace(0, 2 * np.pi, 12_000)[:-1].tolist()]
    huge = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
    refused("geojson:" + _geojson(tmp_path / "huge.geojson", huge), "simplify it")
    # Fiji's box drawn straight across the 180th meridian: refused, not read as the rest of the world
    fiji = {"type": "Polygon", "coordinates": [[[170, -10], [-170, -10], [-170, 10], [170, 10], [170, -10]]]}
    refused("geojson:" + _geojson(tmp_path / "fiji.geojson", fiji), "crosses the 180th meridian")
    wrapped = {"type": "Polygon", "coordinates": [[[170, -10], [190, -10], [190, 10], [170, 10], [170, -10]]]}
    refused("geojson:" + _geojson(tmp_path / "wrapped.geojson", wrapped), "split there")
    (tmp_path / "odd.geojson").write_text('{"type": "FeatureCollection", "features": 5}')
    refused(f"geojson:{tmp_path / 'odd.geojson'}", "not a list")
    # a record's region is data: a string geometry is refused, never read as a path, nor shown from one
    from clue2geo_sdk.evidence.report.sections import _region_text

    spec = f"geojson:{tmp_path / 'districts.geojson'}"
    _geojson(tmp_path / "districts.geojson", ELL)
    assert _region_text(spec) == json.dumps(spec)
    with pytest.raises(RegionError, match="must be a GeoJSON object"):
        Region.parse({"kind": "polygon", "name": "x", "geometry": str(tmp_path / "fiji.geojson")})


def test_cli_geojson_area_is_recorded_and_obeyed(demo_bundle, photo, tmp_path) -> None:  # noqa: ANN001
    from click.testing import CliRunner

    from clue2geo_sdk.cli import main

    # south-west Iceland, drawn as a quadrilateral (not a box): the demo's answers lie elsewhere
    sw_iceland = {"type": "Polygon", "coordinates": [[[-24, 63.3], [-19, 63.3], [-20, 65], [-24.5, 65.5], [-24, 63.3]]]}
    path = _geojson(tmp_path / "sw-iceland.geojson", sw_iceland)
    out = tmp_path / "r.jsonl"
    args = ["locate", str(photo), "--bundle", str(demo_bundle), "--out", str(out), "--no-verify"]
    args += ["--max-cue-tokens", "96", "--max-answer-tokens", "48", "--region", f"geojson:{path}"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text().splitlines()[-1])
    area = Region.parse(f"geojson:{path}")
    assert rec["region"] == area.to_dict() and rec["region"]["name"] == "sw-iceland"
    assert _in_region(area, rec["lat"], rec["lon"])
    assert all(_in_region(area, c["lat"], c["lon"]) for c in rec["candidates"])
    # the case report's Region row states the area as the prompt did (the options block keeps the outline)
    res = CliRunner().invoke(
        main, ["report", str(out), "--bundle", str(demo_bundle), "--out", str(tmp_path / "c.html")]
    )
    assert res.exit_code == 0, res.output
    page = (tmp_path / "c.html").read_text(encoding="utf-8")
    assert "<th>Region</th><td>inside the area &#x27;sw-iceland&#x27;, which lies between latitude 63.3000" in page
