"""``clue2geo gallery``: build and inspect reference galleries of the analyst's own photos."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import Clue2GeoError

EXIT_SOME_FAILED = 3  # as ``locate``: the gallery was written, but some photos or rows could not be added


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from ..bundle.manifest import Bundle
    from ..retrieval.photos import Problem, build_gallery

    try:
        bundle = Bundle.open(bundle_path, verify=verify)
    except Clue2GeoError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
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
            summary = build_gallery(
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
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
    if as_json:
        click.echo(json.dumps(summary.to_dict()))
    else:
        click.echo(
            f"{summary.added} added, {summary.already} already in the gallery, {summary.skipped} without a position, "
            f"{summary.failed} failed; {summary.count} photos in {out}"
            + (f"; {summary.conflicts} conflicting positions (first kept)" if summary.conflicts else "")
        )
    if summary.conflicts:
        click.secho(
            f"{summary.conflicts} row(s) gave a photo already in the gallery another position; each photo keeps its "
            f"first position (listed in {out / 'errors.jsonl'})",
            fg="yellow",
            err=True,
        )
    if summary.failed:
        click.secho(f"failures are listed in {out / 'errors.jsonl'}", fg="yellow", err=True)
    if summary.failed or summary.conflicts:
        sys.exit(EXIT_SOME_FAILED)


@gallery.command("info")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def info_cmd(path: Path) -> None:
    """Print a gallery's manifest (encoder digest, count, content digest) as JSON, after checking
    that its rows, vectors and index agree."""
    from ..retrieval.photos import PhotoGallery

    try:
        g = PhotoGallery(path)
    except Clue2GeoError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(1)
    click.echo(json.dumps({**g.manifest, "digest": g.digest, "search": "exact" if g.exact else "hnsw"}, indent=2))
