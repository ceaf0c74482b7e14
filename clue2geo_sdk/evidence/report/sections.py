"""One record on the page: its index row and its section (photo, summary, map, cluemap, answers,
candidates, metadata, raw answers, chain of custody).

A record is untrusted input: each part is drawn on its own (:func:`_guarded`), so a field of the
wrong type costs that part only, named on the page; a record that cannot be shown at all gets a row
and a section that say so (:func:`unshown_entry`). Nothing here raises past :func:`record_entry`'s caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import Clue2GeoError
from ...evaluation.metrics import distance_km
from ...geo.region import Region
from ...runs.records import Record
from .custody import custody_html
from .figures import SOURCE_COLORS, Thumbnail, clue_sets, cue_color, load_thumbnail, map_svg, photo_svg, record_points
from .leads import leads_html
from .style import esc, finite, json_kind, json_text, km, list_field, num, table_rows


def _cue_item(n: int, k: int, i: Any, cues: list[Any], cols: int) -> str:
    """Member ``k`` (0: the primary) of clue set ``n``: cue ``i`` of the record's cue list."""
    if not isinstance(i, int) or not 0 <= i < len(cues):
        return f"<li>cue #{esc(i)} is not in the record's cue list</li>"
    c = cues[i]
    if not isinstance(c, Mapping):
        return f"<li>cue #{i} is a JSON {json_kind(c)}, not an object</li>"
    patch = c.get("patch", -1)
    where = (
        f"patch {patch} (row {patch // cols + 1}, col {patch % cols + 1})"
        if isinstance(patch, int) and patch >= 0
        else "no patch"
    )
    tag = (
        f'<span class="swatch" style="border-color:{cue_color(n)}"></span><b>primary</b> · {where} · ' if k == 0 else ""
    )
    return (
        f'<li class="{"primary" if k == 0 else "member"}">{tag}<b class="cue">{esc(c.get("cue"))}</b>'
        f"{': ' + esc(c.get('description')) if c.get('description') else ''} "
        f"<small>S_l {num(c.get('s_l'), '.3f')} · S_s {num(c.get('s_s'), '.3f')} · "
        f"S_r {num(c.get('s_r'), '.3f')}</small></li>"
    )


def _cluemap_html(rec: Record, grid: tuple[int, int]) -> str:
    cues = list_field(rec.cues, "cues")
    sets = clue_sets(rec)
    if not sets:
        why = {"skipped": "the cluemap was switched off (use_cluemap=False)", "failed": "no usable cue list"}
        return f"<p>No clue sets: {esc(why.get(str(rec.cues_status), rec.cues_status))}.</p>"
    out = ['<ol class="cluemap">']
    for n, s in enumerate(sets, start=1):
        idx = [s.get("primary"), *(s.get("members") or [])] if isinstance(s, Mapping) else []
        items = [_cue_item(n, k, i, cues, grid[1]) for k, i in enumerate(idx)]
        out.append(f"<li>Clue set {n}<ul>{''.join(items)}</ul></li>")
    out.append("</ol>")
    return "".join(out)


def _candidates_html(rec: Record) -> str:
    pos = rec.metadata_position
    rows = []
    predicted = finite(rec.lat, rec.lon)
    for c in list_field(rec.candidates, "candidates"):
        if not isinstance(c, Mapping):
            continue
        ok = finite(c.get("lat"), c.get("lon"))
        to_pred = distance_km(rec.lat, rec.lon, c["lat"], c["lon"]) if ok and predicted else None
        to_meta = distance_km(pos["lat"], pos["lon"], c["lat"], c["lon"]) if ok and pos else None
        color = SOURCE_COLORS.get(str(c.get("source")), "#444")
        rows.append(
            f'<tr><td><span style="color:{color}">●</span> {esc(c.get("source"))}</td>'
            f"<td>{num(c.get('lat'))}, {num(c.get('lon'))}</td><td>{num(c.get('score'), '.3f')}</td>"
            f'<td class="text">{esc(c.get("country"))} / {esc(c.get("city"))} / {esc(c.get("landmark"))}</td>'
            f"<td>{km(to_pred)}</td><td>{km(to_meta)}</td></tr>"
        )
    if not rows:
        return "<p>No valid candidates.</p>"
    return (
        '<table class="candidates"><thead><tr><th>source</th><th>lat, lon</th><th>score</th>'
        '<th class="text">model\'s country / city / landmark</th><th>to the lead</th><th>to metadata</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f"<p><small>{int(rec.invalid_candidates or 0)} invalid candidate(s) dropped.</small></p>"
    )


def _metadata_html(rec: Record) -> str:
    meta = rec.metadata
    if meta is None:
        return "<p>No metadata was read for this record.</p>"
    if not isinstance(meta, Mapping):
        raise TypeError(f"the record's 'metadata' is a JSON {json_kind(meta)}, not an object")
    pos = rec.metadata_position
    where = (
        f"{pos['lat']:.6f}, {pos['lon']:.6f} ({esc(pos.get('source'))}"
        f"{', altitude ' + num(pos.get('altitude_m'), '.1f', ' m') if pos.get('altitude_m') is not None else ''})"
        if pos
        else "none"
    )
    camera = " ".join(str(v) for v in (meta.get("make"), meta.get("model")) if v) or None
    problems = "".join(f"<li>{esc(p)}</li>" for p in list_field(meta.get("problems"), "problems"))
    pairs = [
        ("Position in the photo's metadata", where),
        ("Distance metadata position → lead", km(rec.metadata_distance_km)),
        ("Captured (DateTimeOriginal)", esc(meta.get("datetime_original"))),
        ("GPS time (UTC)", esc(meta.get("gps_time_utc"))),
        ("Camera", esc(camera)),
        ("Software", esc(meta.get("software"))),
        ("Format · EXIF · XMP", f"{esc(meta.get('format'))} · {esc(meta.get('exif'))} · {esc(meta.get('xmp'))}"),
    ]
    return (
        f'<table class="kv">{table_rows(pairs)}</table>'
        + (f'<p class="warn">Malformed metadata:</p><ul>{problems}</ul>' if problems else "")
        + "<p><small>The lead never uses the metadata: it can be forged or stripped, and a large "
        "distance between the two is evidence either way.</small></p>"
    )


def _raw_html(rec: Record) -> str:
    """Every generation of every prompt: its text as the model wrote it, and how it was made."""
    raw = rec.raw_outputs
    if not raw:
        return ""
    parts = []
    for prompt, gens in raw.items() if isinstance(raw, Mapping) else ():
        for k, g in enumerate(gens if isinstance(gens, list) else [gens]):
            if isinstance(g, Mapping) and "text" in g:
                info = ", ".join(f"{key} {esc(v)}" for key, v in g.items() if key != "text")
                parts.append(f"<h4>{esc(prompt)} #{k + 1} <small>({info})</small></h4><pre>{esc(g['text'])}</pre>")
            else:
                parts.append(f"<h4>{esc(prompt)} #{k + 1}</h4><pre>{esc(json_text(g))}</pre>")
    if not parts:
        parts.append(f"<pre>{esc(json_text(raw))}</pre>")
    return f'<details class="raw"><summary>The model\'s raw answers</summary>{"".join(parts)}</details>'


def _resolve(image: str, image_root: Path | None) -> Path:
    p = Path(image)
    return image_root / p if image_root is not None and not p.is_absolute() else p


def _region_text(region: Any) -> str:
    """The record's region as the prompt stated it (a polygon's outline is in the record, not here)."""
    if not isinstance(region, dict):  # a record's region is a dict; a string could name a file
        return json_text(region)
    try:
        return Region.parse(region).describe()
    except (Clue2GeoError, TypeError, ValueError, RecursionError):
        return json_text(region)


def _why(exc: BaseException) -> str:
    """An exception as one short line for the page."""
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:300]}{'…' if len(text) > 300 else ''}"


def _guarded(part: str, render: Callable[[], str]) -> str:
    """One part of a record's section; a part that cannot be drawn from this record's fields (a
    results file is untrusted input: hand-edited, or written by another tool) is named instead, and
    the rest of the record and of the report is still shown."""
    try:
        return render()
    except Exception as exc:  # noqa: BLE001 - any fault in one part must not lose the report
        return (
            f'<p class="bad part-failed" data-part="{esc(part)}">{esc(part)} could not be shown: {esc(_why(exc))}</p>'
        )


def unshown_entry(n: int, rec: Any, exc: BaseException) -> tuple[str, str]:
    """The index row and section of a record (or of an entry that is none) that cannot be shown at all."""
    path = rec.path or rec.image if isinstance(rec, Record) else None
    try:
        name = esc(path)
    except Exception:  # noqa: BLE001 - a path whose str() fails
        name = "—"
    why = f"record {n} could not be shown: {_why(exc)}"
    row = (
        f'<tr><td>{n}</td><td><a href="#image-{n}">{name}</a></td><td class="bad">not shown</td>'
        f'<td colspan="3">{esc(why)}</td></tr>'
    )
    section = (
        f'<section class="image unshown" id="image-{n}" data-status="unshown"><h2>#{n} {name}: not shown</h2>'
        f'<p class="notice">{esc(why)}</p><p>The record is in the results file as written; '
        "<code>clue2geo audit verify</code> checks whether it was edited.</p></section>"
    )
    return row, section


def record_entry(
    n: int, r: Any, grid: tuple[int, int], bundle_digest: str | None, results_label: str, image_root: Path | None
) -> tuple[str, str, str]:
    """A record's kind ("ok" or "failed"), index row and section; raises when it cannot be shown
    (``r`` is what the results held there: a :class:`Record`, or anything else, which is named)."""
    if not isinstance(r, Record):
        raise TypeError(f"a {type(r).__name__}, not a record (a JSON object)")
    path = r.path or r.image
    if r.ok:
        row = (
            f'<tr><td>{n}</td><td><a href="#image-{n}">{esc(path)}</a></td><td>ok</td>'
            f"<td>{num(r.lat)}, {num(r.lon)}<br>{esc(_place(r))}</td>"
            f"<td>{num(r.confidence, '.3f')}</td><td>{km(r.metadata_distance_km)}</td></tr>"
        )
        return "ok", row, _ok_section(n, r, grid, bundle_digest, results_label, image_root)
    row = (
        f'<tr><td>{n}</td><td><a href="#image-{n}">{esc(path)}</a></td><td class="bad">failed</td>'
        f'<td colspan="3">{esc(r.error)}: {esc(r.message)}</td></tr>'
    )
    return "failed", row, _failed_section(n, r, bundle_digest, results_label)


def problems_html(problems: Sequence[str] | None) -> str:
    """The problems met reading the results, as a notice (nothing when there were none)."""
    lines = [str(p) for p in problems or ()]
    if not lines:
        return ""
    items = "".join(f"<li>{esc(p)}</li>" for p in lines)
    return (
        f'<div class="notice" id="results-problems"><p>{len(lines)} problem(s) reading the results: what they '
        f"name is not in this report.</p><ul>{items}</ul></div>"
    )


def _thumb_of(rec: Record, image_root: Path | None) -> Thumbnail:
    """The record's photo as found now; a path that cannot even be looked up is said, not raised."""
    image = rec.image or rec.path
    if not image:
        return Thumbnail(status="unknown", path="", note="the record names no image file")
    sha = rec.image_sha256
    try:
        return load_thumbnail(_resolve(str(image), image_root), sha if isinstance(sha, str) else None)
    except (OSError, ValueError) as exc:  # a NUL in the path, a name too long, a permission refused
        return Thumbnail(status="unreadable", path=str(image), note=f"the image cannot be read at report time: {exc}")


def _figure(rec: Record, thumb: Thumbnail, grid: tuple[int, int]) -> str:
    if thumb.status != "ok":
        return f'<div class="notice thumb-{thumb.status}" data-thumb="{thumb.status}">{esc(thumb.note)}</div>'
    photo, notes = photo_svg(rec, thumb, grid)
    notes_html = "".join(f'<p class="warn">{esc(x)}</p>' for x in notes)
    size = f"{thumb.original_size[0]}x{thumb.original_size[1]} px, " if thumb.original_size else ""
    return (
        f'<figure class="thumb">{photo}<figcaption>The photo as read at report time ({size}sha256 matches). '
        f"Dashed: the {grid[0]}x{grid[1]} CLIP patch grid; outlined: the patch that matched each clue "
        f"set's primary cue best (S_l).</figcaption>{notes_html}</figure>"
    )


def _place(rec: Record) -> str | None:
    """The place the prediction fell in: city, region, country (what the record names of them)."""
    return ", ".join(str(v) for v in (rec.city, rec.admin1, rec.country) if v) or None


def _summary(rec: Record) -> str:
    where = (
        f"<b>{num(rec.lat)}, {num(rec.lon)}</b> · {esc(_place(rec))} <small>(a lead to check, not a conclusion)</small>"
    )
    if not finite(rec.lat, rec.lon):
        where += (
            f' <span class="bad">the record\'s lat/lon ({esc(json_text(rec.lat))}, '
            f"{esc(json_text(rec.lon))}) are not finite numbers</span>"
        )
    region = []
    if rec.region:
        dropped = rec.outside_region or 0
        dropped_text = str(dropped) if isinstance(dropped, int) else esc(json_text(dropped))
        region = [("Region", f"{esc(_region_text(rec.region))} · {dropped_text} outside dropped")]
    answer = f"{esc(rec.model_country)} / {esc(rec.model_city)} / {esc(rec.landmark)}"
    return table_rows(
        [
            ("Investigative lead", where),
            ("Model's answer", answer),
            ("Confidence", num(rec.confidence, ".3f")),
            ("Won by", f"{esc(rec.source)}{' · fallback' if rec.fallback else ''}"),
            ("Candidate spread", km(rec.spread_km)),
            ("Metadata position → lead", km(rec.metadata_distance_km)),
            ("Cues", esc(rec.cues_status)),
            *region,
        ]
    )


def _ok_section(
    n: int,
    rec: Record,
    grid: tuple[int, int],
    bundle_digest: str | None,
    results_label: str,
    image_root: Path | None,
) -> str:
    thumb = _thumb_of(rec, image_root)
    figure = _guarded("The photo", lambda: _figure(rec, thumb, grid))
    summary = _guarded("The summary", lambda: f'<table class="kv">{_summary(rec)}</table>')
    local = _guarded(
        "The map", lambda: map_svg(record_points(rec), zoom=True, css_class="local", label=f"map of image {n}")
    )
    return f"""<section class="image ok" id="image-{n}" data-status="ok" data-thumb="{thumb.status}">
<h2>#{n} {esc(rec.path)}</h2>
<div class="top">{figure}<div>{summary}{local}</div></div>
<h3>Cluemap</h3>{_guarded("The cluemap", lambda: _cluemap_html(rec, grid))}
<h3>Investigative lead and ranked alternatives</h3>{_guarded("The answers", lambda: leads_html(rec))}
<h3>Candidates</h3>{_guarded("The candidates", lambda: _candidates_html(rec))}
<h3>Photo metadata</h3>{_guarded("The photo metadata", lambda: _metadata_html(rec))}
{_guarded("The raw answers", lambda: _raw_html(rec))}
{_guarded("The chain of custody", lambda: custody_html(rec, thumb, bundle_digest, results_label))}
</section>"""


def _failed_section(n: int, rec: Record, bundle_digest: str | None, results_label: str) -> str:
    custody = _guarded("The chain of custody", lambda: custody_html(rec, None, bundle_digest, results_label))
    return f"""<section class="image failed" id="image-{n}" data-status="error">
<h2>#{n} {esc(rec.path or rec.image)}: failed</h2>
<p class="notice">{esc(rec.error)}: {esc(rec.message)}</p>
{custody}
</section>"""
