"""The training-data builder: geotagged photos -> one JSONL per stage in the paper's templates.

RC (city-level reasoning, fig. 3): image + question -> {country, city, Reasons}
RL (landmark-level reasoning, fig. 4): image + cluemap -> {country, city, landmark, lat, lon, Reasons}
OL (landmark-level location optimisation, fig. 5): image + cluemap -> {country, city, landmark, lat, lon}

Cues and cluemaps come from the runtime's own code with a teacher bundle (or cues from a JSONL).
Reasoning chains are, as in the paper, written for the TRUE location: the teacher is told the answer
and explains the cues that support it (``training/prompts.py``); every chain is also written to
``reasons.jsonl`` for review, and an edited copy passed back as the reasons file replaces it. Each
record says where its parts came from.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs

from clue2geo_sdk.engines.image_tokens import IMAGE_MAX_TOKENS
from clue2geo_sdk.errors import ImageLoadError
from clue2geo_sdk.geolocator import Geolocator
from clue2geo_sdk.inputs.image import load_image
from clue2geo_sdk.pipeline.parsing import valid_coordinate
from clue2geo_sdk.sanitize import clean_text

from .prompts import REASON_TEMPLATES, place_text

STAGES = ("rc", "rl", "ol")
SPLITS = ("train", "val")
REASON_MAX_CHARS = 4000
REASON_MAX_TOKENS = 512  # a step-by-step chain; the answer budget (128) would cut it short


@attrs.frozen(kw_only=True)
class Row:
    """One usable CSV row: a readable path and valid coordinates, with the names the CSV gives."""

    key: str  # the CSV's path, relative to the images folder (how cues / reasons files name it)
    path: Path
    lat: float
    lon: float
    country: str | None
    city: str | None
    landmark: str | None


def read_rows(csv_path: Path, images: Path) -> tuple[list[Row], dict[str, list[str]]]:
    """``path, lat, lon`` (+ optional country, city, landmark). Bad rows are returned by reason."""
    rows: list[Row] = []
    bad: dict[str, list[str]] = {"missing_file": [], "bad_coordinates": []}
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        need = {"path", "lat", "lon"} - {c.strip().lower() for c in reader.fieldnames or []}
        if need:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(sorted(need))}")
        for i, raw in enumerate(reader, start=2):
            r = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            path = images / r["path"]
            try:
                lat, lon = float(r["lat"]), float(r["lon"])
            except ValueError:
                bad["bad_coordinates"].append(f"line {i}: {r['lat']!r}, {r['lon']!r}")
                continue
            if not valid_coordinate(lat, lon):
                bad["bad_coordinates"].append(f"line {i}: out of range {lat}, {lon}")
                continue
            if not path.is_file():
                bad["missing_file"].append(f"line {i}: {path}")
                continue
            rows.append(
                Row(
                    key=Path(r["path"]).as_posix(),
                    path=path,
                    lat=lat,
                    lon=lon,
                    country=r.get("country") or None,
                    city=r.get("city") or None,
                    landmark=r.get("landmark") or None,
                )
            )
    return rows, bad


def split_of(path: Path, val_percent: int) -> str:
    """Deterministic split by a hash of the file name (stable across machines and runs)."""
    h = int(hashlib.sha256(path.name.encode()).hexdigest()[:8], 16)
    return "val" if h % 100 < val_percent else "train"


def _coord(x: float) -> str:
    """A coordinate as the answers and teacher prompts write it: fixed 6 decimals (about 0.1 m)."""
    return f"{x:.6f}"


def _record(path: Path, prompt: str, answer: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """One chat-format training record: the image and prompt, the JSON answer, and where its parts came from."""
    return {
        "image": str(path.resolve()),
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
            {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
        ],
        "meta": meta,
    }


def _load_jsonl(path: Path | None) -> dict[str, dict[str, Any]]:
    """Objects keyed by their ``path`` (or ``id``): the CSV's relative path, or a bare file name."""
    if path is None:
        return {}
    out = {}
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            obj = json.loads(line)
            key = obj.get("path", obj.get("id"))
            if key is None:
                raise ValueError(f"{path} line {i}: no 'path' (or 'id') key")
            out[Path(str(key)).as_posix()] = obj
    return out


def _given(table: dict[str, dict[str, Any]], row: Row) -> dict[str, Any] | None:
    """The entry for a row: by its relative path, else by its file name (same-named files in
    different folders are told apart by giving their relative paths)."""
    return table.get(row.key) or table.get(row.path.name)


def teacher_reason(
    teacher: Geolocator,
    image: Any,
    stage: str,
    loc: dict[str, Any],
    cluemap: str,
    max_tokens: int = REASON_MAX_TOKENS,
) -> str:
    """The teacher's reasoning chain for the known location ``loc`` (paper §3.2), as one clean line."""
    place = place_text(loc["country"], loc["city"], loc["landmark"] if stage == "rl" else None)
    prompt = REASON_TEMPLATES[stage].format(place=place, lat=loc["lat"], lon=loc["lon"], cluemap=cluemap)
    return clean_text(teacher.ask(image, prompt, max_tokens=max_tokens), REASON_MAX_CHARS) or ""


@attrs.define(kw_only=True)
class _RowBuilder:
    """What turning a row into records needs (the teacher, the given cues and chains, the settings),
    with the count of each part's source for the summary."""

    teacher: Geolocator
    cues_given: dict[str, dict[str, Any]]
    reasons_given: dict[str, dict[str, Any]]
    reason_tokens: int
    val_percent: int
    sources: dict[str, dict[str, int]] = attrs.Factory(
        lambda: {"cues": {"teacher": 0, "file": 0}, "reasons": {"teacher": 0, "file": 0}}
    )

    def location(self, row: Row) -> dict[str, Any]:
        """The true location: the CSV's names where given, else the reverse geocoder's."""
        place = self.teacher.geocoder.lookup(row.lat, row.lon)
        return {
            "country": row.country or place.country or None,
            "city": row.city or place.city or None,
            "landmark": row.landmark,
            "lat": _coord(row.lat),
            "lon": _coord(row.lon),
        }

    def cluemap(self, row: Row, image: Any) -> tuple[str, str]:
        """The rendered cluemap and where its cues came from (``file`` or ``teacher``)."""
        given = _given(self.cues_given, row)
        cues = [(c["cue"], c.get("description", "")) for c in given["cues"]] if given else None
        cm, _ = self.teacher.cluemap(image, cues=cues)
        source = "file" if given else "teacher"
        self.sources["cues"][source] += 1
        return cm.render(), source

    def reasons(self, row: Row, image: Any, loc: dict[str, Any], cluemap: str) -> tuple[dict[str, str], dict[str, str]]:
        """The RC and RL chains and their sources: a reviewed chain from the reasons file, else the teacher's."""
        from_file = _given(self.reasons_given, row) or {}
        why: dict[str, str] = {}
        why_src: dict[str, str] = {}
        for stage in ("rc", "rl"):
            if from_file.get(stage):
                why[stage], why_src[stage] = str(from_file[stage]), "file"
            else:
                why[stage], why_src[stage] = (
                    teacher_reason(self.teacher, image, stage, loc, cluemap, self.reason_tokens),
                    "teacher",
                )
            self.sources["reasons"][why_src[stage]] += 1
        return why, why_src

    def records(self, row: Row, image: Any) -> tuple[dict[str, Any], str, dict[str, dict[str, Any]]]:
        """The row's review entry, its split, and its record for each stage."""
        loc = self.location(row)
        cluemap, cue_src = self.cluemap(row, image)
        why, why_src = self.reasons(row, image, loc, cluemap)
        review = {"path": row.key, **why, "source": why_src}
        split = split_of(row.path, self.val_percent)
        meta = {
            "lat": row.lat,
            "lon": row.lon,
            "cues_source": cue_src,
            "country_source": "csv" if row.country else "reverse_geocoder",
            "city_source": "csv" if row.city else "reverse_geocoder",
            "split": split,
        }
        prompts = self.teacher.prompts
        recs = {
            "rc": _record(
                row.path,
                prompts["city_reason"].format(),
                {"country": loc["country"], "city": loc["city"], "Reasons": why["rc"]},
                {**meta, "reasons_source": why_src["rc"]},
            ),
            "rl": _record(
                row.path,
                prompts["locate_reason"].format(cluemap=cluemap),
                {**loc, "Reasons": why["rl"]},
                {**meta, "reasons_source": why_src["rl"]},
            ),
            "ol": _record(row.path, prompts["locate"].format(cluemap=cluemap), loc, meta),
        }
        return review, split, recs


@contextlib.contextmanager
def _open_outputs(out_dir: Path) -> Iterator[tuple[dict[tuple[str, str], TextIO], TextIO]]:
    """The six ``<stage>.<split>.jsonl`` files and ``reasons.jsonl``, closed together however the build ends."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        files = {
            (s, sp): stack.enter_context(open(out_dir / f"{s}.{sp}.jsonl", "w", encoding="utf-8"))
            for s in STAGES
            for sp in SPLITS
        }
        review = stack.enter_context(open(out_dir / "reasons.jsonl", "w", encoding="utf-8"))
        yield files, review


def _summary(
    csv_path: Path,
    images: Path,
    teacher: Geolocator,
    rows: list[Row],
    bad: dict[str, list[str]],
    counts: dict[str, int],
    sources: dict[str, dict[str, int]],
    val_percent: int,
) -> dict[str, Any]:
    """summary.json: what was written and skipped, where the parts came from, and the templates and
    image-token budget that training and the exported bundle must share."""
    prompts = teacher.prompts
    return {
        "csv": str(csv_path),
        "images": str(images),
        "teacher_bundle": teacher.bundle.name,
        "rows_read": len(rows) + len(bad["missing_file"]) + len(bad["bad_coordinates"]),
        "written": counts,
        "skipped": {k: len(v) for k, v in bad.items()},
        "skipped_detail": bad,
        "sources": sources,
        "templates": {k: prompts[k] for k in ("city_reason", "locate_reason", "locate")},
        "reason_templates": REASON_TEMPLATES,
        # The image-token budget the student trains with and its bundle infers with (one number).
        "image_max_tokens": int(teacher.bundle.params("vlm").get("image_max_tokens") or IMAGE_MAX_TOKENS),
        "val_percent": val_percent,
    }


def build_dataset(
    csv_path: Path,
    images: Path,
    teacher: Geolocator,
    out_dir: Path,
    *,
    cues_jsonl: Path | None = None,
    reasons_jsonl: Path | None = None,
    val_percent: int = 10,
    reason_tokens: int = REASON_MAX_TOKENS,
    on_row: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write ``{rc,rl,ol}.{train,val}.jsonl``, ``reasons.jsonl`` (every chain, for review) and
    ``summary.json``; return the summary. A reasons entry ``{path, rc?, rl?}`` replaces the teacher's
    chain for the stages it names."""
    rows, bad = read_rows(csv_path, images)
    bad["unreadable_image"] = []
    builder = _RowBuilder(
        teacher=teacher,
        cues_given=_load_jsonl(cues_jsonl),
        reasons_given=_load_jsonl(reasons_jsonl),
        reason_tokens=reason_tokens,
        val_percent=val_percent,
    )
    counts = {f"{s}.{sp}": 0 for s in STAGES for sp in SPLITS}
    with _open_outputs(out_dir) as (files, review):
        for row in rows:
            try:
                img = load_image(row.path)
            except ImageLoadError as exc:
                bad["unreadable_image"].append(str(exc))
                continue
            entry, split, recs = builder.records(row, img.image)
            review.write(json.dumps(entry, ensure_ascii=False) + "\n")
            for stage, rec in recs.items():
                files[(stage, split)].write(json.dumps(rec, ensure_ascii=False) + "\n")
                counts[f"{stage}.{split}"] += 1
            if on_row:
                on_row(row.path.name)
    summary = _summary(csv_path, images, teacher, rows, bad, counts, builder.sources, val_percent)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
