"""Model text -> typed values: JSON, the paper's single-quoted dicts, loose text, and refusals."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from clue2geo_sdk.pipeline.parsing import extract_json, parse_cues, parse_location, to_float, valid_coordinate


def test_paper_style_answer() -> None:
    text = "'country': 'United States', 'city': 'South Dakota', 'landmark': 'Mount Rushmore', 'lat': '43.8811', 'lon': '-103.4542'"
    a = parse_location("{" + text + "}")
    assert (a.country, a.landmark, a.lat, a.lon) == ("United States", "Mount Rushmore", 43.8811, -103.4542)
    assert a.valid


def test_json_inside_prose_and_nulls() -> None:
    a = parse_location('Sure! {"country": "France", "city": null, "landmark": "null", "lat": 48.85, "lon": 2.29} done')
    assert a.city is None and a.landmark is None and (a.lat, a.lon) == (48.85, 2.29)


def test_out_of_range_and_unparsable_are_invalid_not_zero() -> None:
    for text in (
        '{"lat": "123.4", "lon": "10.0"}',
        '{"lat": 10, "lon": 181}',
        '{"lat": "north", "lon": "1"}',
        "no idea",
        "",
    ):
        a = parse_location(text)
        assert not a.valid and a.lat is None and a.lon is None, text


def test_loose_lat_lon_and_hemisphere_letters() -> None:
    a = parse_location("latitude: 35.6895, longitude: 139.6917")
    assert (a.lat, a.lon) == (35.6895, 139.6917)
    assert to_float("33.86 S") == -33.86 and to_float("151.2 E") == 151.2
    assert to_float(True) is None and to_float("nan") is None and to_float(float("inf")) is None


def test_cues_json_and_figure2_format() -> None:
    assert parse_cues('[{"cue": "Sign", "description": "Red STOP sign"}, {"cue": "Tree"}]') == [
        ("Sign", "Red STOP sign"),
        ("Tree", ""),
    ]
    text = "(Tower structure, A tall tower with a metal framework)\n(Scene type, urban street)"
    assert parse_cues(text) == [
        ("Tower structure", "A tall tower with a metal framework"),
        ("Scene type", "urban street"),
    ]
    assert parse_cues("nothing here") is None
    assert parse_cues('[{"cue": "x", "description": "line1\nline2"}]') == [("x", "line1\nline2")]


@given(st.floats(-90, 90), st.floats(-180, 180))
def test_any_valid_coordinate_round_trips(lat: float, lon: float) -> None:
    a = parse_location(f'{{"lat": "{lat:.6f}", "lon": "{lon:.6f}"}}')
    assert a.valid and abs(a.lat - lat) < 1e-6 and abs(a.lon - lon) < 1e-6
    assert valid_coordinate(a.lat, a.lon)


@given(st.text(max_size=200))
def test_parsers_never_raise(text: str) -> None:
    parse_location(text)
    parse_cues(text)
    extract_json(text, dict)
