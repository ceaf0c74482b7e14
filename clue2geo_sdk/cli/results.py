"""``clue2geo export`` and ``clue2geo report``: written results (a JSONL journal, or a ``locate --ray``
run folder) into other formats and into the case report; never onto their own input."""

from __future__ import annotations

from pathlib import Path

import click

from ..bundle.manifest import Bundle
from ..cluster import is_run_dir, read_shards
from ..cluster.shards import merge, shard_files, write_jsonl
from ..errors import Clue2GeoError
from ..evidence.case import write_case
from ..evidence.kml import write_kml, write_kmz
from ..evidence.report.render import write_report
from ..files import regular_file
from ..runs.formats import write_csv, write_geojson
from ..runs.journal import read_journal
from ..runs.records import Record, valid_records
from ..runs.resume import latest_records
from .common import fail, key_files, reason, same_file, warn

#: What ``export --to`` writes, by the file's suffix (lower-cased).
EXPORT_SUFFIXES = (".jsonl", ".geojson", ".csv", ".html", ".htm", ".kml", ".kmz", ".jsonld")


def inputs_of(records: Path) -> list[Path]:
    """The files a results argument is read from: the journal, or a run folder's shards."""
    return shard_files(records) if records.is_dir() else [records]


def refuse_own_input(dest: Path, records: Path, option: str) -> None:
    if same_file(dest, *inputs_of(records)):
        fail(f"{option} {dest} is the results being read ({records}); write to another file (never onto its input)")


def read_results(records: Path) -> tuple[list[Record], list[str]]:
    """The latest record per image of a JSONL results file, or the merged shards of a ``--ray`` run
    folder. A record with a field of the wrong type is skipped, named by file and line (a warning)."""
    try:
        if records.is_dir():
            if not is_run_dir(records):
                raise click.UsageError(f"{records} is a folder but not a 'locate --ray' run (no shards/ in it)")
            journal = valid_records(read_shards(records))
            recs = [Record.of(r) for r in merge(journal.records)]
        else:
            journal = valid_records(read_journal(regular_file(records, "results file")))
            recs = list(latest_records(journal.records).values())
    except Clue2GeoError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot read results {records}: {reason(exc)}")
    for problem in journal.problems:
        warn(f"warning: {problem}")
    return recs, list(journal.problems)


@click.command("export")
@click.argument("records", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--to",
    "dest",
    required=True,
    type=click.Path(path_type=Path),
    help=".geojson, .csv, .jsonl, .html (report), .kml / .kmz (Google Earth, GIS) or .jsonld (CASE/UCO).",
)
@click.option(
    "--bundle", "bundle_path", type=click.Path(path_type=Path), help="For .html: the bundle (its CLIP patch grid)."
)
@click.option(
    "--image-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="For .kmz: folder that relative image paths in the records are read from (default: the current folder).",
)
def export_records(records: Path, dest: Path, bundle_path: Path | None, image_root: Path | None) -> None:
    """Convert a JSONL results file, or a 'locate --ray' run folder (its shards merged), into GeoJSON,
    CSV, JSONL, the HTML map report, KML / KMZ (with thumbnails) or CASE/UCO JSON-LD (latest record
    per image). The format is the --to file's suffix."""
    suffix = dest.suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise click.UsageError(f"cannot export to {dest.suffix!r}; use {', '.join(EXPORT_SUFFIXES)}")
    refuse_own_input(dest, records, "--to")
    recs, problems = read_results(records)
    try:
        if suffix == ".jsonl":
            write_jsonl(dest, [r.to_dict() for r in recs])
        elif suffix == ".geojson":
            write_geojson(dest, recs)
        elif suffix == ".csv":
            write_csv(dest, recs)
        elif suffix == ".kml":
            write_kml(dest, recs)
        elif suffix == ".kmz":
            write_kmz(dest, recs, image_root)
        elif suffix == ".jsonld":
            write_case(dest, recs)
        else:
            bundle = Bundle.open(bundle_path, verify=False) if bundle_path is not None else None
            write_report(dest, recs, bundle, results_path=records, problems=problems)
    except Clue2GeoError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write {dest}: {reason(exc)}")
    click.echo(f"{len(recs)} records -> {dest}")


@click.command("report")
@click.argument("records", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "dest", required=True, type=click.Path(path_type=Path), help="The HTML report to write.")
@click.option(
    "--bundle",
    "bundle_path",
    type=click.Path(path_type=Path),
    help="The bundle that made the records: its CLIP patch grid (else 3x3) and digest, checked against theirs.",
)
@click.option(
    "--image-root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder that relative image paths in the records are read from (default: the current folder).",
)
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    help="Examiner's Ed25519 public key (as for audit verify): only a signature by it is shown as holding; repeatable.",
)
@click.option(
    "--tsa-ca",
    "tsa_cas",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A time-stamping authority's CA certificate (PEM, as for audit stamp-verify --ca): each timestamp beside "
    "the results is verified against it; repeatable.",
)
def report_cmd(
    records: Path,
    dest: Path,
    bundle_path: Path | None,
    image_root: Path | None,
    trusted_keys: tuple[str, ...],
    tsa_cas: tuple[Path, ...],
) -> None:
    """Write the case report: one self-contained offline HTML file (the bundle's validation, photos with
    the matched patches, each image's investigative lead with its ranked alternatives, cluemap,
    candidates and metadata position on a map, chain of custody) of a JSONL results file or a
    'locate --ray' run folder. Photos are read again and shown only if their sha256 still matches.
    Without --trusted-key, the report says a signature was not checked against a key you trust.

    RFC 3161 timestamps are found beside the results as RESULTS.tsr, RESULTS.*.tsr (one per TSA) or
    STEM.tsr (RESULTS' name without its suffix), with the query RESULTS.tsq ('audit stamp-request');
    each is verified against the --tsa-ca certificates, and without them shown as not verified."""
    key_files(trusted_keys, "--trusted-key")
    refuse_own_input(dest, records, "--out")
    recs, problems = read_results(records)
    try:
        bundle = Bundle.open(bundle_path, verify=False) if bundle_path is not None else None
    except Clue2GeoError as exc:
        fail(exc)
    try:
        write_report(
            dest,
            recs,
            bundle,
            image_root=image_root,
            results_path=records,
            trusted_keys=trusted_keys or None,
            problems=problems,
            tsa_cas=tsa_cas,
        )
    except Clue2GeoError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write {dest}: {reason(exc)}")
    click.echo(f"{len(recs)} records -> {dest}")
