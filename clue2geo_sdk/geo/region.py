"""Region constraints: where the analyst already knows the photo was taken.

A region is a set of countries (real Natural Earth borders), a bounding box, a circle (centre and
radius in km), or the analyst's own area: a GeoJSON polygon (e.g. drawn in a GIS). The pipeline
retrieves references only inside it, tells the model, drops candidates outside it (counted), and
falls back to the nearest in-region reference when none remains.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np

from .._native import shapely_module
from ..errors import RegionError
from ..files import InputFileError, read_regular_bytes
from .countries import countries
from .distance import haversine_km

Kind = Literal["countries", "bbox", "circle", "polygon"]
#: Every record carries its region, so an area's outline is kept small: simplify larger ones first.
MAX_POLYGON_VERTICES = 10_000


def _finite(v: float, what: str) -> float:
    """``v`` as a float; NaN and infinities are refused (a record must stay valid JSON)."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise RegionError(f"{what} {v!r} is not a number") from None
    if not math.isfinite(f):
        raise RegionError(f"{what} {v!r} is not a finite number")
    return f


def _lat(v: float, what: str) -> float:
    v = _finite(v, f"{what} latitude")
    if not -90.0 <= v <= 90.0:
        raise RegionError(f"{what} latitude {v} is outside [-90, 90]")
    return v


def _lon(v: float, what: str) -> float:
    v = _finite(v, f"{what} longitude")
    if not -180.0 <= v <= 180.0:
        raise RegionError(f"{what} longitude {v} is outside [-180, 180]")
    return v


@attrs.frozen(kw_only=True)
class Region:
    """Build with :meth:`of_countries`, :meth:`bbox`, :meth:`circle` or :meth:`parse`.

    A country is every territory in Natural Earth's polygon for its code (France includes French
    Guiana and Réunion), plus :data:`~clue2geo_sdk.geo.countries.BORDER_TOLERANCE_DEG` around it.

    A box with ``west > east`` crosses the antimeridian (e.g. west=170, east=-170 is 20° wide);
    west=-180, east=180 is every longitude (``bbox:-180,-90,180,90`` is the whole world).
    Every number must be finite.

    A polygon is GeoJSON (longitude, latitude in WGS84 degrees, RFC 7946), stored as its compact
    JSON text so that the region, its records and its options digest name the exact outline.
    """

    kind: Kind
    codes: tuple[str, ...] = ()
    west: float = 0.0
    south: float = 0.0
    east: float = 0.0
    north: float = 0.0
    lat: float = 0.0
    lon: float = 0.0
    radius_km: float = 0.0
    name: str = ""
    geometry: str = ""  # polygon: the GeoJSON geometry, compact JSON

    @classmethod
    def of_countries(cls, codes: Iterable[str]) -> Region:
        known = countries()
        norm = tuple(sorted({known.get(c).code for c in codes}))
        if not norm:
            raise RegionError("a country region needs at least one ISO 3166-1 alpha-2 code")
        return cls(kind="countries", codes=norm)

    @classmethod
    def bbox(cls, west: float, south: float, east: float, north: float) -> Region:
        s, n = _lat(south, "box south"), _lat(north, "box north")
        w, e = _lon(west, "box west"), _lon(east, "box east")
        if s >= n:
            raise RegionError(f"box south {s} must be below north {n}")
        if w == e or (w == 180.0 and e == -180.0):  # -180..180 is the whole circle, not zero width
            raise RegionError(f"box west {w} and east {e} are the same meridian: the box has no width")
        return cls(kind="bbox", west=w, south=s, east=e, north=n)

    @classmethod
    def circle(cls, lat: float, lon: float, radius_km: float) -> Region:
        r = _finite(radius_km, "circle radius (km)")
        if not r > 0:
            raise RegionError(f"circle radius must be > 0 km, got {radius_km}")
        return cls(kind="circle", lat=_lat(lat, "circle centre"), lon=_lon(lon, "circle centre"), radius_km=r)

    @classmethod
    def polygon(cls, geojson: str | Path | dict, *, name: str | None = None) -> Region:
        """A GeoJSON Polygon or MultiPolygon: a geometry, Feature or FeatureCollection (its polygons
        together), as a dict or the path of a ``.geojson`` file. ``name`` defaults to the file's stem.

        A file that is not a regular file (a FIFO would block for ever) is refused before it is
        opened; nesting too deep for Python's parser is refused with the file named. The prepared
        outline is built and used once here (:meth:`warm`), before any thread can share it."""
        what = "polygon"
        if not isinstance(geojson, dict):
            path = Path(geojson)
            what, name = str(path), name or path.stem
            try:
                geojson = json.loads(read_regular_bytes(path, "region polygon").decode("utf-8-sig"))
            except InputFileError as exc:
                raise RegionError(str(exc)) from None
            except RecursionError:
                raise RegionError(
                    f"region polygon {path}: JSON nested too deeply to be GeoJSON (an area needs a few levels); "
                    "not read"
                ) from None
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise RegionError(f"region polygon {path}: not readable GeoJSON ({exc})") from None
        try:
            text = json.dumps(_area(_polygons_of(geojson, what), what), separators=(",", ":"), sort_keys=True)
        except RecursionError:
            raise RegionError(f"region {what}: GeoJSON nested too deeply (an area needs a few levels)") from None
        region = cls(kind="polygon", name=name or "area", geometry=text)
        region.warm()
        return region

    @classmethod
    def parse(cls, spec: str | Sequence[str] | Region | dict) -> Region:
        """``"FR,DE"`` · ``"bbox:WEST,SOUTH,EAST,NORTH"`` · ``"circle:LAT,LON,KM"`` ·
        ``"geojson:PATH"`` · a list of codes · a dict from :meth:`to_dict` · a Region."""
        if isinstance(spec, Region):
            return spec
        if isinstance(spec, dict):
            kind = spec.get("kind")
            try:
                if kind == "countries":
                    return cls.of_countries(spec.get("codes", ()))
                if kind == "bbox":
                    return cls.bbox(spec["west"], spec["south"], spec["east"], spec["north"])
                if kind == "circle":
                    return cls.circle(spec["lat"], spec["lon"], spec["radius_km"])
                if kind == "polygon":
                    if not isinstance(spec["geometry"], dict):  # a record's region never names a file
                        raise RegionError(f"region {str(spec)[:200]!r}: polygon geometry must be a GeoJSON object")
                    return cls.polygon(spec["geometry"], name=str(spec.get("name") or "") or None)
            except (KeyError, TypeError, ValueError) as exc:
                if isinstance(exc, RegionError):
                    raise
                raise RegionError(f"region {spec!r}: missing or bad field ({exc})") from None
            raise RegionError(f"region {spec!r}: kind must be countries, bbox, circle or polygon")
        if not isinstance(spec, str):
            return cls.of_countries(spec)
        text = spec.strip()
        head, _, rest = text.partition(":")
        if head.lower() == "geojson":
            return cls.polygon(Path(rest.strip()))
        if head.lower() in ("bbox", "circle"):
            try:
                nums = [float(x) for x in rest.split(",")]
            except ValueError:
                raise RegionError(f"region {spec!r}: {head} needs numbers separated by commas") from None
            try:
                if head.lower() == "bbox":
                    if len(nums) != 4:
                        raise RegionError("bbox needs WEST,SOUTH,EAST,NORTH (4 numbers)")
                    return cls.bbox(*nums)
                if len(nums) != 3:
                    raise RegionError("circle needs LAT,LON,KM (3 numbers)")
                return cls.circle(*nums)
            except RegionError as exc:
                raise RegionError(f"region {spec!r}: {exc}") from None
        return cls.of_countries([c for c in text.split(",") if c.strip()])

    def warm(self) -> None:
        """Build a polygon's prepared outline and use it once, so that GEOS builds its lazy index
        now, in this thread: that first use is unsafe across threads (GEOS issue 825), as for the
        country borders. Called when a polygon region is built; harmless to call again."""
        if self.kind == "polygon":
            _shape(self.geometry)  # warmed inside, before it is cached
        elif self.kind == "countries":
            countries()  # loaded and warmed once per process

    def contains(self, lat: np.ndarray | float, lon: np.ndarray | float) -> np.ndarray:
        """Vectorized membership (borders and box edges count as inside)."""
        la, lo = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
        if self.kind == "countries":
            return countries().contains(self.codes, la, lo)
        if self.kind == "bbox":
            in_lat = (la >= self.south) & (la <= self.north)
            if self.west <= self.east:
                return in_lat & (lo >= self.west) & (lo <= self.east)
            return in_lat & ((lo >= self.west) | (lo <= self.east))
        if self.kind == "polygon":
            shapely = shapely_module()

            return np.asarray(shapely.intersects_xy(_shape(self.geometry), lo, la))
        return np.asarray(haversine_km(self.lat, self.lon, la, lo) <= self.radius_km)

    def anchor(self) -> tuple[float, float]:
        """A (lat, lon) inside the region: the answer of last resort when nothing else is in it."""
        if self.kind == "countries":
            geoms = [countries().get(c).geometry for c in self.codes]
            pt = max(geoms, key=lambda g: g.area).representative_point()
            return float(pt.y), float(pt.x)
        if self.kind == "bbox":
            east = self.east if self.west <= self.east else self.east + 360.0
            lon = (self.west + east) / 2.0
            return (self.south + self.north) / 2.0, lon - 360.0 if lon > 180.0 else lon
        if self.kind == "polygon":
            pt = _shape(self.geometry).representative_point()
            return float(pt.y), float(pt.x)
        return self.lat, self.lon

    def describe(self) -> str:
        """The constraint as the prompt states it to the model."""
        if self.kind == "countries":
            names = [f"{countries().get(c).name} ({c})" for c in self.codes]
            return "in " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1])
        if self.kind == "bbox":
            across = " (eastward across the 180° meridian)" if self.west > self.east else ""
            return (
                f"inside the box from latitude {self.south:.4f} to {self.north:.4f} and longitude "
                f"{self.west:.4f} to {self.east:.4f}{across}"
            )
        if self.kind == "polygon":
            west, south, east, north = _shape(self.geometry).bounds
            return (
                f"inside the area {self.name!r}, which lies between latitude {south:.4f} and {north:.4f} "
                f"and longitude {west:.4f} and {east:.4f}"
            )
        return f"within {self.radius_km:g} km of latitude {self.lat:.4f}, longitude {self.lon:.4f}"

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "countries":
            return {"kind": "countries", "codes": list(self.codes)}
        if self.kind == "bbox":
            return {"kind": "bbox", "west": self.west, "south": self.south, "east": self.east, "north": self.north}
        if self.kind == "polygon":
            return {"kind": "polygon", "name": self.name, "geometry": json.loads(self.geometry)}
        return {"kind": "circle", "lat": self.lat, "lon": self.lon, "radius_km": self.radius_km}


def _polygons_of(doc: Any, what: str) -> list[Any]:
    """The polygons (each a GeoJSON Polygon's coordinates) of a GeoJSON Polygon or MultiPolygon,
    Feature or FeatureCollection; a collection's other features (points, lines) are skipped."""
    if not isinstance(doc, dict):
        raise RegionError(f"region {what}: GeoJSON must be an object, got {type(doc).__name__}")
    kind = doc.get("type")
    if kind == "Feature":
        if doc.get("geometry") is None:
            raise RegionError(f"region {what}: the Feature has no geometry")
        return _polygons_of(doc["geometry"], what)
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise RegionError(f"region {what}: the FeatureCollection's 'features' is not a list")
        polys = []
        for feature in features:
            geom = feature.get("geometry") if isinstance(feature, dict) else None
            if isinstance(geom, dict) and geom.get("type") in ("Polygon", "MultiPolygon"):
                polys += _polygons_of(geom, what)
        if not polys:
            raise RegionError(f"region {what}: the FeatureCollection has no Polygon or MultiPolygon feature")
        return polys
    if kind in ("Polygon", "MultiPolygon") and isinstance(doc.get("coordinates"), list):
        return [doc["coordinates"]] if kind == "Polygon" else list(doc["coordinates"])
    raise RegionError(f"region {what}: a {kind or 'untyped'} GeoJSON object; an area needs a Polygon or MultiPolygon")


def _area(polygons: list[Any], what: str) -> dict[str, Any]:
    """The area the polygons cover together (adjacent or overlapping districts merge), as a GeoJSON
    geometry, after refusing what would silently select the wrong area: projected metres, outlines
    across the antimeridian, broken or huge outlines."""
    shapely = shapely_module()
    shape, mapping = shapely.geometry.shape, shapely.geometry.mapping

    parts, vertices = [], 0
    for i, coords in enumerate(polygons, start=1):
        where = f"region {what}" + (f", polygon {i}" if len(polygons) > 1 else "")
        try:
            part = shapely.force_2d(shape({"type": "Polygon", "coordinates": coords}))  # altitudes dropped
        except (ValueError, TypeError, IndexError, AttributeError, OverflowError, shapely.errors.ShapelyError) as exc:
            raise RegionError(f"{where}: malformed polygon coordinates ({exc})") from None
        if part.is_empty:
            raise RegionError(f"{where}: the polygon is empty")
        vertices += shapely.get_num_coordinates(part)
        if vertices > MAX_POLYGON_VERTICES:
            raise RegionError(
                f"region {what}: more than {MAX_POLYGON_VERTICES} vertices (every record carries the region); "
                "simplify it first"
            )
        xy = shapely.get_coordinates(part)
        if not np.isfinite(xy).all() or (np.abs(xy[:, 0]) > 180).any() or (np.abs(xy[:, 1]) > 90).any():
            west, south, east, north = part.bounds
            raise RegionError(
                f"{where}: coordinates span longitude {west:g}..{east:g}, latitude {south:g}..{north:g}; GeoJSON needs "
                "WGS84 degrees in (longitude, latitude) order (reproject it, e.g. from EPSG:3857 metres; an area "
                "across the 180th meridian is split there, RFC 7946 3.1.9)"
            )
        for ring in (part.exterior, *part.interiors):
            lon = np.asarray(ring.coords)[:, 0]
            on_edge = (np.abs(lon[:-1]) == 180) & (np.abs(lon[1:]) == 180)  # along the map's edge, not across
            if ((np.abs(np.diff(lon)) > 180) & ~on_edge).any():
                raise RegionError(
                    f"{where}: an edge jumps more than 180 degrees of longitude: the area crosses the 180th "
                    "meridian; split it there into two polygons (RFC 7946 3.1.9)"
                )
        if not part.is_valid:
            raise RegionError(f"{where}: not a valid polygon ({shapely.is_valid_reason(part)}); fix it in a GIS")
        if part.area == 0:
            raise RegionError(f"{where}: the polygon encloses no area")
        parts.append(part)
    # Normalised (ring starts and orientation fixed), so a record's outline parses back to the same text.
    union = shapely.normalize(parts[0] if len(parts) == 1 else shapely.unary_union(parts))
    return json.loads(json.dumps(mapping(union)))  # tuples to lists, as a record holds it


@functools.lru_cache(maxsize=16)
def _shape(geometry: str) -> Any:
    """The polygon, prepared for fast point tests (cached: a batch tests the same area many times)."""
    shapely = shapely_module()

    shape = shapely.geometry.shape(json.loads(geometry))
    shapely.prepare(shape)
    # GEOS builds a prepared geometry's index on first use, unsafely across threads (GEOS issue 825):
    # use it once here, before lru_cache hands it to any other thread (as countries.py does).
    shapely.intersects_xy(shape, 0.0, 0.0)
    return shape
