"""clue2geo: offline photo geolocation with the Clue2Geo method.

from clue2geo_sdk import Geolocator
with Geolocator.load("artifacts/demo") as geo:
    pred = geo.locate("photo.jpg")
    print(pred.lat, pred.lon, pred.country, pred.city, pred.confidence)
"""

from ._version import __version__
from .bundle import Bundle
from .errors import (
    BundleExistsError,
    BundleFormatError,
    BundleIntegrityError,
    BundleNotFoundError,
    Clue2GeoError,
    ExportValidationError,
    ImageLoadError,
    MissingExtraError,
    RegionError,
)
from .geolocator import Failure, Geolocator, Options
from .region import Region
from .results import Candidate, Prediction

__all__ = [
    "Bundle",
    "BundleExistsError",
    "BundleFormatError",
    "BundleIntegrityError",
    "BundleNotFoundError",
    "Candidate",
    "Clue2GeoError",
    "ExportValidationError",
    "Failure",
    "Geolocator",
    "ImageLoadError",
    "MissingExtraError",
    "Options",
    "Prediction",
    "Region",
    "RegionError",
    "__version__",
]
