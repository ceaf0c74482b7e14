"""Results: frozen attrs classes with one ``to_dict``; JSON, GeoJSON and ``from_dict`` derive from it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from .errors import RecordFormatError

SOURCES = ("direct", "rag5", "rag10", "rag15", "gallery_nearest", "region_anchor")


@attrs.frozen(kw_only=True)
class Cue:
    """One cue with its three scores and the grid patch (row-major index) that matched it best."""

    cue: str
    description: str
    s_l: float = 0.0
    s_s: float = 0.0
    s_r: float = 0.0
    patch: int = -1

    @property
    def text(self) -> str:
        return f"{self.cue}: {self.description}" if self.description else self.cue

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class Answer:
    """One distinct answer: the best member's position and score, the summed confidence, and which
    candidates (indices into the prediction's ``candidates``, best first) it merged."""

    rank: int
    lat: float
    lon: float
    score: float
    confidence: float | None  # None: nothing was weighed (see Prediction.confidence)
    members: tuple[int, ...] = attrs.field(converter=tuple)
    sources: tuple[str, ...] = attrs.field(converter=tuple)
    extent_km: float
    country: str | None = None
    city: str | None = None
    references: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["members"], d["sources"] = list(self.members), list(self.sources)
        return d


@attrs.frozen(kw_only=True)
class Candidate:
    """A candidate location: who proposed it and its GPSCLIP cosine to the image (the selection score)."""

    source: str
    lat: float
    lon: float
    score: float
    country: str | None = None
    city: str | None = None
    landmark: str | None = None
    sample: int = 0

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class Prediction:
    """Where the photo was taken, and everything that led there.

    ``answers`` are the distinct candidates (merged within 25 km), best score first; ``answers[0]``
    holds the winner. ``confidence`` is ``answers[0].confidence``: the share of a softmax over the
    candidates' and the nearest gallery points' GPSCLIP cosines (GeoCLIP's logit scale) that falls on
    the winning answer — the model's relative preference, to be read against a reliability table
    (``clue2geo eval --calibration``), not a probability by itself (:mod:`clue2geo_sdk.pipeline.answers`).
    It is None when there was nothing to weigh the winner against (a lone fallback point).
    ``similarity`` is the winner's GPSCLIP cosine mapped from [-1, 1] to [0, 1]. ``references`` are
    the gallery points the RAG prompts were shown (``similar`` / ``dissimilar``, with their cosines)
    and which gallery they came from.
    ``spread_km`` is the median great-circle distance from the winner to the other
    valid candidates: small when the model's independent answers agree.

    ``country`` and ``country_code`` are the country whose Natural Earth border contains the winning
    coordinate (None at sea); ``admin1`` and ``city`` the nearest GeoNames place in that country. The
    model's own strings are kept apart (``model_country``, ``model_city``, ``landmark``), cleaned of
    control characters and capped in length. ``cues_status`` is "ok",
    "reasked" (the free answer did not parse; the schema-constrained one did), "failed" (no usable
    cue list: the cluemap is empty) or "skipped" (``use_cluemap=False``). ``region`` is the region
    constraint, if any, and ``outside_region`` how many candidates it dropped.

    ``metadata`` is what the photo's own EXIF / XMP says (:class:`clue2geo_sdk.inputs.metadata.photo.PhotoMetadata`
    as a dict: position, capture time, camera, and ``problems`` naming every malformed value); the
    prediction never uses it. ``metadata_distance_km`` is the great-circle distance from the photo's
    own position to the prediction (None when it has none): a large one means the pixels and the
    metadata disagree, which is evidence either way (a forged or wrong position, or a wrong prediction).
    """

    lat: float
    lon: float
    country: str | None
    country_code: str | None
    admin1: str | None
    city: str | None
    landmark: str | None
    model_country: str | None
    model_city: str | None
    confidence: float | None
    spread_km: float | None
    source: str
    fallback: bool
    candidates: tuple[Candidate, ...]
    invalid_candidates: int
    cues: tuple[Cue, ...]
    cluemap: Mapping[str, Any] | None
    raw_outputs: Mapping[str, Any]
    timings: Mapping[str, float]
    image_sha256: str
    image: str
    bundle: str
    options: Mapping[str, Any] = attrs.field(factory=dict)
    cues_status: str = "ok"
    metadata: Mapping[str, Any] | None = None
    metadata_distance_km: float | None = None
    region: Mapping[str, Any] | None = None
    outside_region: int = 0
    answers: tuple[Answer, ...] = ()
    similarity: float | None = None
    references: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        d["cues"] = [c.to_dict() for c in self.cues]
        d["answers"] = [a.to_dict() for a in self.answers]
        for key in ("cluemap", "raw_outputs", "timings", "options", "metadata", "region", "references"):
            d[key] = dict(d[key]) if d[key] is not None else None
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        """The prediction of ``to_dict`` output, or of a journal record (``runs.records.record_of``: the same
        fields plus the journal's own, such as ``path``, ``status`` and ``record_hash``, which are
        dropped). A dict with unknown keys and no ``status`` is refused (a typo must not pass), as is
        a record of a failure; a malformed value is a :class:`RecordFormatError` naming its field."""
        if not isinstance(data, Mapping):
            raise RecordFormatError(f"Prediction.from_dict: expected a mapping, got {type(data).__name__}")
        fields = {f.name for f in attrs.fields(cls)}
        if "status" in data:  # a journal record: the prediction's fields beside the journal's own
            if data["status"] != "ok":
                what = data.get("path") or data.get("image") or "?"
                raise RecordFormatError(
                    f"Prediction.from_dict: the record of {what} has status {data['status']!r}, not 'ok': "
                    f"it records a failure ({data.get('error')}: {data.get('message')}), not a prediction"
                )
            data = {k: v for k, v in data.items() if k in fields}
        unknown = set(data) - fields
        if unknown:
            raise RecordFormatError(f"Prediction.from_dict: unknown keys {sorted(unknown)}")
        missing = sorted(f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING and f.name not in data)
        if missing:
            raise RecordFormatError(f"Prediction.from_dict: missing keys {missing}")

        d = dict(data)
        try:
            d["candidates"] = tuple(Candidate(**c) for c in d.get("candidates") or ())
            d["cues"] = tuple(Cue(**c) for c in d.get("cues") or ())
            d["answers"] = tuple(Answer(**a) for a in d.get("answers") or ())
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise RecordFormatError(f"Prediction.from_dict: malformed record ({exc})") from None

    def to_geojson(self) -> dict[str, Any]:
        """A GeoJSON Feature (coordinates in lon, lat order as GeoJSON requires)."""
        props = {k: v for k, v in self.to_dict().items() if k not in ("lat", "lon")}
        return {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [self.lon, self.lat]},
            "properties": props,
        }


@attrs.frozen(kw_only=True)
class Failure:
    """An input that could not be geolocated; batches record it and go on."""

    image: str
    error: str
    message: str
    image_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "error": self.error, "message": self.message, "image_sha256": self.image_sha256}
