"""The case report: one self-contained, offline HTML file that someone else can read and check.

Nothing is fetched: no CDN, fonts, tiles or scripts (a Content-Security-Policy forbids them all, so
even a model string that slipped past escaping could not run or call out); the photos are embedded
as ``data:`` URIs. Per image it shows

* a thumbnail of the photo, read again from the record's ``image`` path at report time (decoded and
  EXIF-transposed by :func:`clue2geo_sdk.inputs.image.load_image`, as the pipeline saw it) and shown only
  when its sha256 is still the record's ``image_sha256``; a missing or changed file is said instead;
* the CLIP patch that matched each primary cue, outlined: patches are cut exactly as
  :func:`clue2geo_sdk.engines.encoders.patch_grid` cuts them, on the bundle's ``clip.patch_grid``;
* the investigative lead (rank 1 of the record's answers) and its ranked alternatives, each with its
  distance from the lead, confidence and score;
* the cluemap (clue sets), the candidates, the lead and the photo's own metadata position on a
  world map of Natural Earth country outlines (:mod:`clue2geo_sdk.geo.countries`), with the distances;
* the model's raw answers, folded away (unfolded when printed);
* a chain-of-custody block: UTC start/end, image sha256, bundle digest, SDK version, options, the
  record's hash links (recomputed here), and how to check the whole chain (``clue2geo audit verify``).

At the top: the bundle and its validation in one line (its known error rates,
:func:`clue2geo_sdk.bundle.validation.headline`), or that no bundle was given; what kind of opinion a
result is (an investigative lead with ranked alternatives, never a conclusion: :mod:`.leads`); each
RFC 3161 timestamp saved beside the results, verified against the TSA's CA when one is given
(:mod:`.stamps`). The results' hash chain is checked, and each examiner's signature (``audit sign``): shown
as holding (green) only when made by a key the user trusts (``trusted_keys``, ``report --trusted-key``);
one that verifies only with the public key stored in the signatures file is said to be *not checked
against a key you trust*. Failed records appear with their error; a record with fields of the wrong
type is shown as far as it can be, each part that cannot be drawn named (never failing the report).
The page prints one image per page (``@media print``).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..._version import __version__
from ...bundle.manifest import MANIFEST_FILE, Bundle
from ...bundle.validation import headline
from ...cluster import is_run_dir
from ...runs.records import Record
from ..attestation import journal_digest
from .custody import audit_line, load_trusted_keys
from .figures import BORDER, LAND, PREDICTION_COLOR, SOURCE_COLORS, map_svg, overview_points, world_path
from .leads import OPINION
from .sections import problems_html, record_entry, unshown_entry
from .stamps import load_tsa_cas, stamps_html
from .style import CSP, STYLE, code, esc, json_text

#: The bundle a report is drawn with: an opened Bundle, its folder, or a file inside it; None: no bundle.
BundleInput = Bundle | str | os.PathLike[str] | None

_DEMO_BANNER = (
    '<p id="demo-warning" class="banner" role="alert">'
    "Made with a demo bundle (random-weight models): these locations are meaningless. "
    "They show the plumbing only; do not use them as evidence.</p>"
)


def _open_bundle(bundle: BundleInput) -> Bundle | None:
    """A Bundle from a Bundle (used as given), its folder or a file inside it (opened without
    verifying: the report only reads its patch grid, name and digest), or None."""
    if bundle is None or isinstance(bundle, Bundle):
        return bundle
    path = Path(bundle)
    for folder in (path, *path.parents):
        if (folder / MANIFEST_FILE).is_file():
            return Bundle.open(folder, verify=False)
    raise FileNotFoundError(f"{bundle}: not a bundle (no manifest.json in it or above it)")


def _grid(b: Bundle | None) -> tuple[tuple[int, int], str]:
    """The bundle's CLIP patch grid (rows, cols), and a note when its value is unusable (3x3 then)."""
    if b is None:
        return (3, 3), ""
    raw = b.params("clip").get("patch_grid", [3, 3])
    if (
        isinstance(raw, list | tuple)
        and len(raw) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 64 for v in raw)
    ):
        return (raw[0], raw[1]), ""
    return (3, 3), f" (its clip.patch_grid {json_text(raw)[:80]} is not two small positive integers)"


def _grid_note(b: Bundle | None) -> str:
    """Which patch grid the outlines are drawn on, and from where."""
    if b is None:
        return "3x3 assumed (no bundle given)"
    (rows, cols), fault = _grid(b)
    return f"{rows}x{cols} from bundle {esc(b.name)} ({code(b.digest)}){esc(fault) if fault else ''}"


def _bundle_note(b: Bundle | None, options_digest: str | None) -> str:
    """The bundle the report was given, and its validation (known error rates) in one line, saying
    so when the results were made under other options (``options_digest``: theirs, when one)."""
    if b is None:
        return (
            '<br><span id="bundle-validation" class="warn">No bundle was given to this report: the validation '
            "(known error rates) of the bundle that made these results is not stated here (pass --bundle).</span>"
        )
    return (
        f"<br>Bundle: {esc(b.name)} (manifest digest {code(b.digest)}, models digest {code(b.models_digest)})"
        f'<br>Validation: <span id="bundle-validation">{esc(headline(b, options_digest))}</span>'
    )


def _entries(
    records: Sequence[Any], b: Bundle | None, results_label: str, image_root: Path | None
) -> tuple[dict[str, int], str, str]:
    """How many records were located, failed or not shown; the index table's rows; the sections."""
    grid = _grid(b)[0]
    bundle_digest = b.digest if b is not None else None
    rows, sections = [], []
    counts = {"ok": 0, "failed": 0, "unshown": 0}
    for n, r in enumerate(records, start=1):
        try:
            kind, row, section = record_entry(n, r, grid, bundle_digest, results_label, image_root)
        except Exception as exc:  # noqa: BLE001 - one malformed record must not lose the report
            kind, (row, section) = "unshown", unshown_entry(n, r, exc)
        counts[kind] += 1
        rows.append(row)
        sections.append(section)
    return counts, "".join(rows), "".join(sections)


def _source(results_path: Path | None) -> str:
    """The results the records came from, with the digest ``audit sign`` and ``audit stamp-request``
    cover (:func:`~clue2geo_sdk.evidence.attestation.journal_digest`): a journal's sha256, or a run
    folder's digest over its shards."""
    if results_path is None:
        return ""
    path = Path(results_path)
    if path.is_file():
        return f"<br>Results file: {code(results_path)} (sha256 {code(journal_digest(path))})"
    if is_run_dir(path):
        return f"<br>Results: {code(results_path)} (run digest over its shards {code(journal_digest(path))})"
    return f"<br>Results: {code(results_path)}"


def _header(title: str, counts: Mapping[str, int], demo: bool, facts: str, checks: str, overview: str) -> str:
    """The page's top: title, demo banner, counts and ``facts`` (source, patch grid), ``checks`` (the
    problems reading the results, hash chain and signatures) and the ``overview`` map."""
    unshown = f", {counts['unshown']} could not be shown" if counts["unshown"] else ""
    generated = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    legend = "".join(f'<span><span style="color:{c}">●</span> {s}</span>' for s, c in SOURCE_COLORS.items())
    return f"""<header><h1>{esc(title)}</h1>
{_DEMO_BANNER if demo else ""}
<p>{counts["ok"]} located, {counts["failed"]} failed{unshown}. Generated {generated} by clue2geo SDK {esc(__version__)}.{facts}.</p>
{checks}
{OPINION}
{overview}
<p class="legend"><span><span style="color:{PREDICTION_COLOR}">●</span> investigative lead (numbered)</span>
<span>◇ position in the photo's metadata</span>{legend}</p>
<p><small>Country outlines: Natural Earth 1:10m admin-0 (public domain), drawn offline.</small></p>
</header>"""


def _page(title: str, summary: Mapping[str, Any], header: str, index_rows: str, sections: str) -> str:
    """The whole document: style, policy, the shared world outline, header, index and sections."""
    data = html.escape(json.dumps(dict(summary), allow_nan=False))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{esc(title)}</title><style>{STYLE}</style></head>
<body data-summary="{data}">
<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>
<path id="world" d="{world_path()}" fill="{LAND}" stroke="{BORDER}" stroke-width="0.6" fill-rule="evenodd"
 vector-effect="non-scaling-stroke" stroke-linejoin="round"/></defs></svg>
{header}
<h2>Images</h2>
<table class="index"><thead><tr><th>#</th><th>image</th><th>status</th><th>investigative lead</th><th>confidence</th>
<th>metadata distance</th></tr></thead><tbody>{index_rows}</tbody></table>
{sections}
</body></html>
"""


def render_report(
    records: Iterable[Record | Mapping[str, Any]],
    bundle: BundleInput = None,
    *,
    title: str = "clue2geo case report",
    image_root: Path | None = None,
    results_path: Path | None = None,
    trusted_keys: Sequence[str] | None = None,
    problems: Sequence[str] | None = None,
    tsa_cas: Sequence[str | os.PathLike[str]] | None = None,
) -> str:
    """The case report of ``records`` (latest record per image) as one HTML string.

    ``bundle`` (a :class:`~clue2geo_sdk.bundle.manifest.Bundle`, its folder or a file in it) gives the
    CLIP patch grid the outlines are drawn on (3x3 without one). Relative image paths are read from
    ``image_root`` (else the current folder). ``results_path``, the journal the records came from, is
    hashed, checked with :func:`clue2geo_sdk.runs.chain.verify_journal` and named in the custody blocks;
    its signatures are shown as holding (green) only when made by one of ``trusted_keys`` (public key
    files or key text, as ``--trusted-key`` takes them). A record with fields of the wrong type is
    shown as far as it can be, and a part (or a record) that cannot be drawn is named, never failing
    the whole report. ``problems``: what was wrong reading the results (records left out, unreadable
    or torn lines), one line each, listed at the top so that a reader of the report knows what it
    does not show. ``tsa_cas``: the TSAs' CA certificates (PEM files, ``report --tsa-ca``) each
    timestamp beside the results is verified against; without them a stamp is shown as not verified.
    A CA file that cannot be read, or holds no certificate, raises before anything is drawn.
    """
    # read leniently: a malformed record is shown part by part; what is no record at all is named
    records = [Record.of(r) if isinstance(r, Record | Mapping) else r for r in records]
    trusted = load_trusted_keys(trusted_keys)
    ca_pem = load_tsa_cas(tsa_cas)
    b = _open_bundle(bundle)
    demo = any(isinstance(r, Record) and r.demo for r in records)
    results_label = str(results_path) if results_path is not None else "RESULTS"
    overview = map_svg(overview_points(records), zoom=False, css_class="world", label="all predictions")
    counts, index_rows, sections = _entries(records, b, results_label, image_root)
    digests = {r.options_digest for r in records if isinstance(r, Record) and isinstance(r.options_digest, str)}
    note = _bundle_note(b, digests.pop() if len(digests) == 1 else None)
    facts = f"{_source(results_path)}{note}\n<br>CLIP patch grid: {_grid_note(b)}"
    checks = f"{problems_html(problems)}\n{audit_line(results_path, trusted)}\n{stamps_html(results_path, ca_pem)}"
    header = _header(title, counts, demo, facts, checks, overview)
    return _page(title, {**counts, "demo": demo}, header, index_rows, sections)


def write_report(
    path: Path,
    records: Iterable[Record | Mapping[str, Any]],
    bundle: BundleInput = None,
    *,
    title: str = "clue2geo case report",
    image_root: Path | None = None,
    results_path: Path | None = None,
    trusted_keys: Sequence[str] | None = None,
    problems: Sequence[str] | None = None,
    tsa_cas: Sequence[str | os.PathLike[str]] | None = None,
) -> Path:
    """Write :func:`render_report` to ``path`` (UTF-8); returns ``path``. ``trusted_keys``: the public
    keys (files or key text, as ``report --trusted-key`` takes them) a signature must be made with to
    be shown as holding; a key (or a ``tsa_cas`` CA file) that cannot be read raises before anything is written."""
    text = render_report(
        records,
        bundle,
        title=title,
        image_root=image_root,
        results_path=results_path,
        trusted_keys=trusted_keys,
        problems=problems,
        tsa_cas=tsa_cas,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
