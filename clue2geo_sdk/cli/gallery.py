"""``clue2geo gallery``: build and inspect reference galleries of the analyst's own photos."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..bundle.manifest import Bundle
from ..errors import Clue2GeoError
from ..retrieval.photo_build import BuildSummary, build_gallery
from ..retrieval.photos import PhotoGallery
from ..retrieval.sources import Problem
from .common import EXIT_SOME_FAILED, fail, warn


@click.group()
def gallery() -> None:
    """Reference galleries from your own geotagged photos (image -> image retrieval)."""


@gallery.command("build")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.option("--bundle", "bundle_path", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Gallery folder.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Photos per embedding batch.")
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Descend into sub-folders of SRC.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the bundle's sha256 digests first.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def build_cmd(
    src: Path,
    bundle_path: Path,
    out: Path,
    batch_size: int,
    recursive: bool,
    device: str,
    verify: bool,
    as_json: bool,
) -> None:
    """Embed the photos of SRC into the gallery --out (created, or extended: photos already in it,
    by sha256, are skipped, so an interrupted build is finished by running it again).

    SRC is a folder (each photo's position from its EXIF / XMP GPS; photos without one are reported
    and skipped) or a CSV of path,lat,lon (relative paths from the CSV's folder). A photo given a
    second, different position (another CSV row, or a later build) keeps its first one; the row is
    reported as a conflict. Exit 0 when every photo was added or already present, 3 when some could
    not be or had conflicting positions (listed in --out/errors.jsonl), 1 when no photo at all could
    be added (no gallery is written)."""
    try:
        bundle = Bundle.open(bundle_path, verify=verify)
    except Clue2GeoError as exc:
        fail(exc)
    summary = _build_with_progress(src, bundle, out, batch_size=batch_size, device=device, recursive=recursive)
    _report(summary, out, as_json)
    if summary.failed or summary.conflicts:
        sys.exit(EXIT_SOME_FAILED)


def _build_with_progress(
    src: Path, bundle: Bundle, out: Path, *, batch_size: int, device: str, recursive: bool
) -> BuildSummary:
    """:func:`build_gallery` under a progress bar (photos embedded; each graph being indexed in bulk),
    each photo not added printed above it; a build that cannot be done at all exits 1."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("embedding", total=None)
        indexing: dict[str, TaskID] = {}

        started = []  # source problems (bad CSV rows) come before the total and are not photos

        def on_total(n: int) -> None:
            started.append(True)
            progress.update(task, total=n)

        def on_photo(name: str, problem: Problem | None) -> None:
            if problem is not None:
                colour = "dim" if problem.kind == "no_position" else "yellow"
                progress.console.print(f"[{colour}]{problem.kind}[/{colour}] {problem.message}")
            if started:
                progress.advance(task)

        def on_index(name: str, rows: int, total: int) -> None:
            if name not in indexing:
                indexing[name] = progress.add_task(f"indexing {name}", total=total)
            progress.update(indexing[name], completed=rows, total=total)

        try:
            return build_gallery(
                src,
                bundle,
                out,
                batch_size=batch_size,
                device=device,
                recursive=recursive,
                on_total=on_total,
                on_photo=on_photo,
                on_index=on_index,
            )
        except Clue2GeoError as exc:
            progress.stop()
            fail(exc)


def _report(summary: BuildSummary, out: Path, as_json: bool) -> None:
    """The summary on stdout (a line, or JSON); conflicts and failures pointed to on stderr."""
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        click.echo(
            f"{summary.added} added, {summary.already} already in the gallery, {summary.skipped} without a position, "
            f"{summary.failed} failed; {summary.count} photos in {out}"
            + (f"; {summary.conflicts} conflicting positions (first kept)" if summary.conflicts else "")
        )
    if summary.conflicts:
        warn(
            f"{summary.conflicts} row(s) gave a photo already in the gallery another position; each photo keeps its "
            f"first position (listed in {out / 'errors.jsonl'})"
        )
    if summary.failed:
        warn(f"failures are listed in {out / 'errors.jsonl'}")


@gallery.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def info_cmd(path: Path) -> None:
    """Print a gallery's manifest (encoder digest, count, content digest) as JSON, after checking
    that its rows, vectors and index agree."""
    try:
        g = PhotoGallery(path)
    except Clue2GeoError as exc:
        fail(exc)
    click.echo(json.dumps({**g.manifest, "digest": g.digest, "search": "exact" if g.exact else "hnsw"}, indent=2))
