"""A bundle's known-answer set: a few photos and the exact records the bundle made for them, re-run on
the installed tool to show it still behaves as it did when validated (``clue2geo bundle selftest``).

The set is the bundle's ``selftest`` component (:func:`~clue2geo_sdk.bundle.attach.attach`): the
photos (``photo-0`` …, small copies so the bundle stays small), ``answers`` (one record per photo,
built by :func:`~clue2geo_sdk.runs.records.record_of` as a batch run builds them) and, in its params,
what they were made with: the models (``models_digest``), the options, how the models were loaded, and
the tolerance. The manifest hashes them, so the set is signed with the bundle.

A re-run matches when, per photo, the photo's sha256, the options digest, the status and winner's
source are equal, and the winner, every candidate (same sources, same order) and every ranked answer
lie within ``tolerance_deg`` of the recorded coordinates; and the bundle's models digest is the one the
set was made with. The tolerance is tiny (1e-4 degrees, about 11 m): the coordinates come from parsed
model text, gallery points and float arithmetic, and only the last can differ (ONNX Runtime and
llama.cpp pick CPU kernels by instruction set); a model that answers differently moves them by far more.
The manifest digest is not compared: attaching the set (or a validation) changes it. Without
``verify`` the set's own files are not checked either: a re-run then shows that the models answer as
recorded (a swapped model file is caught by its answers), not that nobody edited the bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from PIL import Image

from .._version import __version__
from ..bundle.attach import attach
from ..bundle.components import Component
from ..bundle.manifest import Bundle
from ..errors import BundleFormatError, Clue2GeoError, InvalidArgumentError, RecordFormatError
from ..files import atomic_write, read_regular_bytes
from ..geolocator import Geolocator
from ..options import Options
from ..results import Failure
from ..runs.chain import finite
from ..runs.records import Record, identity, record_of

ROLE = "selftest"
ANSWERS_FILE = "answers.jsonl"
TOLERANCE_DEG = 1e-4  # float noise between CPU kernels; a different model moves an answer by far more
SCORE_TOLERANCE = 1e-4  # on confidences and GPSCLIP scores (cosines, probabilities), absolute
PHOTO_WIDTH = 320  # the stored copies' width in pixels: a few tens of KB each
#: How the Geolocator is loaded for the set (recorded, and used again by the re-run).
LOAD_SETTINGS: dict[str, Any] = {"device": "cpu", "engine": "batched", "max_in_flight": 1}


@attrs.frozen(kw_only=True)
class KnownAnswers:
    """A known-answer set written to a folder, ready for :func:`attach`: file key -> path, and params."""

    files: Mapping[str, Path]
    params: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"files": {k: str(v) for k, v in self.files.items()}, "params": dict(self.params)}


@attrs.frozen(kw_only=True)
class PhotoCheck:
    """One photo re-run: where the winner was and is now, and each difference found (none: it matches)."""

    photo: str
    expected: tuple[float, float] | None  # the recorded winner (None: the record was a failure)
    got: tuple[float, float] | None
    mismatches: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class SelftestResult:
    """The re-run of a bundle's known-answer set: ``passed`` when nothing differs."""

    bundle: str
    bundle_digest: str
    models_digest: str
    expected_models_digest: str
    sdk_version: str
    expected_sdk_version: str | None  # informative: another SDK version that answers the same passes
    tolerance_deg: float
    photos: tuple[PhotoCheck, ...]
    mismatches: tuple[str, ...]  # every difference, each naming its photo (or "models")
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "passed": self.passed}


def shrink(photo: str | Path, width: int | None = PHOTO_WIDTH) -> tuple[bytes, str]:
    """A small copy of ``photo`` (JPEG, ``width`` pixels wide, metadata dropped) and its suffix; with
    ``width`` None, the photo's own bytes."""
    data = read_regular_bytes(photo, "known-answer photo")
    if width is None:
        return data, Path(photo).suffix.lower() or ".jpg"
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.width > width:
            img = img.resize((width, max(1, round(img.height * width / img.width))), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=90)
    return out.getvalue(), ".jpg"


def make_known_answers(
    bundle_path: str | Path,
    photos: Sequence[str | Path],
    out_dir: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    width: int | None = PHOTO_WIDTH,
    tolerance_deg: float = TOLERANCE_DEG,
) -> KnownAnswers:
    """Write to ``out_dir`` a small copy of each photo (``photo-N.jpg``) and ``answers.jsonl``: the
    record the bundle makes for each copy under ``options`` (:class:`Options` fields), loaded as
    :data:`LOAD_SETTINGS` says (a photo that fails is recorded as a failure, as a batch run records it,
    and must fail again). Attach the result with :func:`attach` (or use :func:`add_known_answers`)."""
    if not photos:
        raise InvalidArgumentError("a known-answer set needs at least one photo; none was given")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = Options(**dict(options or {}))
    files: dict[str, Path] = {}
    for i, src in enumerate(photos):
        data, suffix = shrink(src, width)
        files[f"photo-{i}"] = out / f"photo-{i}{suffix}"
        atomic_write(files[f"photo-{i}"], data)
    with Geolocator.load(bundle_path, verify=False, **LOAD_SETTINGS) as geo:
        records = [_record(geo, opts, f"{ROLE}/{p.name}", p.read_bytes()) for p in files.values()]
        models = geo.bundle.models_digest
    files["answers"] = out / ANSWERS_FILE
    atomic_write(files["answers"], "".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    params = {
        "models_digest": models,
        "options": opts.to_dict(),
        "load": dict(LOAD_SETTINGS),
        "tolerance_deg": tolerance_deg,
        "photo_width": width,
    }
    return KnownAnswers(files=files, params=params)


def add_known_answers(
    bundle_path: str | Path,
    photos: Sequence[str | Path],
    workdir: str | Path,
    *,
    options: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Bundle:
    """Make a known-answer set for the bundle (:func:`make_known_answers`, in ``workdir``) and attach it;
    returns the bundle reopened. Its manifest digest changes: sign it (again) afterwards."""
    t0 = time.perf_counter()
    made = make_known_answers(bundle_path, photos, workdir, options=options)
    prov = {"sdk_version": __version__, "seconds": round(time.perf_counter() - t0, 2), **dict(provenance or {})}
    return attach(Bundle.open(bundle_path, verify=False), ROLE, made.files, params=made.params, provenance=prov)


def _record(geo: Geolocator, opts: Options, name: str, data: bytes) -> dict[str, Any]:
    """The record a batch run would write for ``data``, named by its path inside the bundle."""
    t0 = time.perf_counter()
    result = geo.try_locate(data, name=name, options=opts)
    if isinstance(result, Failure):  # as a batch records it: the input's digest, though it failed
        result = attrs.evolve(result, image_sha256=hashlib.sha256(data).hexdigest())
    return finite(record_of(result, name, time.perf_counter() - t0, identity(geo, opts), abs_path=name))


def _pair(rec: Mapping[str, Any]) -> tuple[float, float] | None:
    lat, lon = rec.get("lat"), rec.get("lon")
    return (lat, lon) if isinstance(lat, int | float) and isinstance(lon, int | float) else None


def _shown(pos: tuple[float, float] | None) -> str:
    return "none" if pos is None else f"{pos[0]:.6f},{pos[1]:.6f}"


def _near(a: tuple[float, float] | None, b: tuple[float, float] | None, tol: float) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a[0] - b[0]) <= tol and abs(a[1] - b[1]) <= tol


def _values(label: str, want: Mapping[str, Any], got: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    """Differences in the numbers ``keys`` (scores, confidences) beyond :data:`SCORE_TOLERANCE`."""
    out = []
    for k in keys:
        w, g = want.get(k), got.get(k)
        numbers = isinstance(w, int | float) and isinstance(g, int | float)
        if (w is None) != (g is None) or (numbers and abs(w - g) > SCORE_TOLERANCE) or (not numbers and w != g):
            out.append(f"{label} {k} {g!r} expected {w!r}")
    return out


def _points(
    what: str, want: Sequence[Any], got: Sequence[Any], tol: float, keys: tuple[str, ...], values: tuple[str, ...]
) -> list[str]:
    """Differences between two ranked lists of points (candidates, answers): count, then per rank the
    ``keys`` (equal), the ``values`` (within :data:`SCORE_TOLERANCE`) and the position (within ``tol``)."""
    want = [w for w in want if isinstance(w, Mapping)]
    got = [g for g in got if isinstance(g, Mapping)]
    if len(want) != len(got):
        return [f"{len(got)} {what} expected {len(want)}"]
    out = []
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        label = f"{what} {i + 1}"
        for k in keys:
            if w.get(k) != g.get(k):
                out.append(f"{label} {k} {g.get(k)!r} expected {w.get(k)!r}")
        out += _values(label, w, g, values)
        if not _near(_pair(w), _pair(g), tol):
            out.append(f"{label} at {_shown(_pair(g))} expected {_shown(_pair(w))}")
    return out


def compare_records(expected: Mapping[str, Any], got: Mapping[str, Any], tol: float = TOLERANCE_DEG) -> list[str]:
    """Every way ``got`` (a re-run's record) differs from ``expected`` (the recorded one), in words:
    photo digest, options digest, status and error, winner's source, position and confidence,
    candidates (source, position, score), ranked answers (sources, position, confidence)."""
    out = []
    for key, what in (
        ("image_sha256", "photo sha256"),
        ("options_digest", "options digest"),
        ("status", "status"),
        ("error", "error"),
    ):
        if expected.get(key) != got.get(key):
            out.append(f"{what} {got.get(key)} expected {expected.get(key)}")
    if got.get("status") == "error" and expected.get("status") != "error":
        out.append(f"failed: {got.get('error')}: {got.get('message')}")
    if expected.get("source") != got.get("source"):
        out.append(f"winner source {got.get('source')!r} expected {expected.get('source')!r}")
    if not _near(_pair(expected), _pair(got), tol):
        out.append(f"winner {_shown(_pair(got))} expected {_shown(_pair(expected))}")
    out += _values("winner", expected, got, ("confidence",))
    want_c, got_c = expected.get("candidates") or [], got.get("candidates") or []
    out += _points("candidates", want_c, got_c, tol, ("source",), ("score",))
    want_a, got_a = expected.get("answers") or [], got.get("answers") or []
    out += _points("answers", want_a, got_a, tol, ("sources",), ("confidence", "score"))
    return out


def _component(bundle: Bundle) -> Component:
    """The bundle's known-answer set; a bundle without one is refused by name."""
    comp = bundle.components.get(ROLE)
    if comp is None:
        raise BundleFormatError(
            f"bundle {bundle.name!r} ({bundle.root}) carries no known-answer set (no {ROLE!r} component in its "
            "manifest); make one with clue2geo_sdk.evaluation.selftest.add_known_answers"
        )
    return comp


def read_known_answers(bundle: Bundle) -> tuple[list[tuple[str, Path]], list[dict[str, Any]]]:
    """The set's photos (key, path) and records, in order; a bundle without one, or with a malformed
    one, is refused by name."""
    comp = _component(bundle)
    path = bundle.file(ROLE, "answers")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [Record.from_dict(json.loads(line)).to_dict() for line in lines if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecordFormatError) as exc:
        raise BundleFormatError(f"bundle {bundle.name!r}: known answers {path} cannot be read: {exc}") from None
    keys = [f"photo-{i}" for i in range(len(records))]
    if not records or sorted(comp.files) != sorted([*keys, "answers"]):
        raise BundleFormatError(
            f"bundle {bundle.name!r}: known-answer set holds {len(records)} record(s) and files "
            f"{', '.join(sorted(comp.files))}: expected answers and one photo-N per record, from photo-0"
        )
    return [(k, bundle.file(ROLE, k)) for k in keys], records


def run_selftest(
    bundle_path: str | Path,
    *,
    verify: bool = True,
    trusted_keys: Iterable[Any] | None = None,
    device: str | None = None,
    tolerance_deg: float = TOLERANCE_DEG,
    on_record: Callable[[Mapping[str, Any]], None] | None = None,
) -> SelftestResult:
    """Re-run the bundle's known-answer set and compare (see the module's docstring). ``verify`` (and
    ``trusted_keys``) as :meth:`Bundle.open`; ``device`` default: the one the set was made on;
    ``on_record`` gets each re-run's record as it is made. The tolerance is the caller's, never the
    manifest's (which records the one the set was made for): an edited manifest cannot loosen it.
    A bundle without a set is refused before any model is loaded."""
    t0 = time.perf_counter()
    recorded = _component(Bundle.open(bundle_path, verify=False)).params.get("load")
    recorded = recorded if isinstance(recorded, Mapping) else {}
    load = {k: recorded.get(k, v) for k, v in LOAD_SETTINGS.items()}  # only these: a manifest picks no gallery
    if device is not None:
        load["device"] = device
    try:
        geo = Geolocator.load(bundle_path, verify=verify, trusted_keys=trusted_keys, **load)
    except Clue2GeoError:
        raise  # refused as it should be (corrupt, unsigned, no memory): the message says why
    except Exception as exc:  # a model file onnxruntime or llama.cpp cannot load: a failed test, not a crash
        bundle = Bundle.open(bundle_path, verify=False)
        unloadable = f"models: cannot be loaded: {type(exc).__name__}: {exc}"
        expected = read_known_answers(bundle)[1]
        return _result(bundle, bundle.params(ROLE), expected, [], tolerance_deg, time.perf_counter() - t0, unloadable)
    with geo:
        photos, expected = read_known_answers(geo.bundle)
        params = geo.bundle.params(ROLE)
        opts = Options(**params.get("options", {}))
        checks = []
        for (key, path), want in zip(photos, expected, strict=True):
            got = _record(geo, opts, str(want["path"]), read_regular_bytes(path, f"known-answer {key}"))
            if on_record:
                on_record(got)
            found = tuple(compare_records(want, got, tolerance_deg))
            checks.append(PhotoCheck(photo=key, expected=_pair(want), got=_pair(got), mismatches=found))
        bundle = geo.bundle
    return _result(bundle, params, expected, checks, tolerance_deg, time.perf_counter() - t0)


def _result(
    bundle: Bundle,
    params: Mapping[str, Any],
    expected: Sequence[Mapping[str, Any]],
    checks: Sequence[PhotoCheck],
    tol: float,
    seconds: float,
    *failures: str,
) -> SelftestResult:
    made_with = str(params.get("models_digest"))
    mismatches = list(failures)
    if bundle.models_digest != made_with:
        mismatches.append(f"models: digest {bundle.models_digest}, the known answers were made with {made_with}")
    mismatches += [f"{c.photo}: {m}" for c in checks for m in c.mismatches]
    versions = {r.get("sdk_version") for r in expected}
    return SelftestResult(
        bundle=bundle.name,
        bundle_digest=bundle.digest,
        models_digest=bundle.models_digest,
        expected_models_digest=made_with,
        sdk_version=__version__,
        expected_sdk_version=versions.pop() if len(versions) == 1 else None,
        tolerance_deg=tol,
        photos=tuple(checks),
        mismatches=tuple(mismatches),
        seconds=round(seconds, 2),
    )
