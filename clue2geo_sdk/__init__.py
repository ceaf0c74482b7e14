"""clue2geo: offline photo geolocation with the Clue2Geo method.

from clue2geo_sdk import Geolocator
with Geolocator.load("artifacts/demo") as geo:
    pred = geo.locate("photo.jpg")
    print(pred.lat, pred.lon, pred.country, pred.city, pred.confidence)
"""

from typing import Any

from ._version import __version__
from .bundle.manifest import Bundle
from .bundle.signing import BundleSignatureError, SigningKeyError
from .engines.base import VLMError
from .engines.gguf_header import GGUFHeaderError
from .engines.memory import MemoryNeed, memory_need
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
from .evidence.attestation import ResultsSignatureError
from .evidence.timestamps import TimestampError
from .files import InputFileError
from .geo.region import Region
from .geolocator import Geolocator
from .options import Options
from .results import Candidate, Failure, Prediction
from .retrieval.sources import GalleryBuildError
from .runs.journal import ResultsExistError, ResultsInUseError, ResultsPathError, ResultsWriteError


def __getattr__(name: str) -> Any:
    """``ClusterJobError`` lives with the cluster driver, which needs the ``cluster`` extra (ray):
    imported on first use, so ``import clue2geo_sdk`` never needs ray."""
    if name == "ClusterJobError":
        from .cluster.plan import ClusterJobError  # optional extra: the cluster driver needs ray

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
    "TimestampError",
    "VLMError",
    "__version__",
    "memory_need",
]
