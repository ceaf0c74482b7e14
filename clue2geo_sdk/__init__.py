"""clue2geo: offline photo geolocation with the Clue2Geo method.

from clue2geo_sdk import Geolocator
with Geolocator.load("artifacts/demo") as geo:
    pred = geo.locate("photo.jpg")
    print(pred.lat, pred.lon, pred.country, pred.city, pred.confidence)
"""

from typing import Any

from ._version import __version__
from .attestation import ResultsSignatureError
from .batch import ResultsExistError, ResultsInUseError, ResultsPathError, ResultsWriteError
from .bundle import Bundle
from .engines.base import VLMError
from .errors import (
    BundleExistsError,
    BundleFormatError,
    BundleIntegrityError,
    BundleNotFoundError,
    Clue2GeoError,
    DeviceError,
    ExportValidationError,
    ImageLoadError,
    InsufficientMemoryError,
    InvalidArgumentError,
    MissingExtraError,
    OptionsError,
    RecordFormatError,
    RegionError,
)
from .files import InputFileError
from .geolocator import Failure, Geolocator, MemoryNeed, Options, memory_need
from .gguf_header import GGUFHeaderError
from .reference_gallery import GalleryBuildError
from .region import Region
from .results import Candidate, Prediction
from .signing import BundleSignatureError, SigningKeyError


def __getattr__(name: str) -> Any:
    """``ClusterJobError`` lives with the cluster driver, which needs the ``cluster`` extra (ray):
    imported on first use, so ``import clue2geo_sdk`` never needs ray."""
    if name == "ClusterJobError":
        from .cluster.job import ClusterJobError

        return ClusterJobError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [  # ClusterJobError too, on first use (see __getattr__), left out here so `import *` needs no ray
    "Bundle",
    "BundleExistsError",
    "BundleFormatError",
    "BundleIntegrityError",
    "BundleNotFoundError",
    "BundleSignatureError",
    "Candidate",
    "Clue2GeoError",
    "DeviceError",
    "ExportValidationError",
    "Failure",
    "GGUFHeaderError",
    "GalleryBuildError",
    "Geolocator",
    "ImageLoadError",
    "InputFileError",
    "InsufficientMemoryError",
    "InvalidArgumentError",
    "MemoryNeed",
    "MissingExtraError",
    "Options",
    "OptionsError",
    "Prediction",
    "RecordFormatError",
    "Region",
    "RegionError",
    "ResultsExistError",
    "ResultsInUseError",
    "ResultsPathError",
    "ResultsSignatureError",
    "ResultsWriteError",
    "SigningKeyError",
    "VLMError",
    "__version__",
    "memory_need",
]
