"""What the commands share: how they fail and warn, the progress bar, and the checks on the files
they are given (key files, an output that would overwrite its own input)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..bundle.manifest import Bundle
from ..bundle.validation import headline
from ..errors import Clue2GeoError
from ..files import regular_file
from ..runs.records import Record

EXIT_SOME_FAILED = 3
DEMO_WARNING = (
    "warning: bundle {name!r} has random-weight parts (a demo bundle): its predictions are meaningless; "
    "it shows the plumbing only"
)


def fail(exc: Exception | str) -> NoReturn:
    """``error: …`` in red on stderr, exit 1."""
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


def warn(msg: str) -> None:
    click.secho(msg, fg="yellow", err=True)


def warn_if_demo(bundle: Bundle) -> None:
    """One line on stderr when the bundle's predictions mean nothing, so no one takes them for real."""
    if bundle.demo:
        warn(DEMO_WARNING.format(name=bundle.name))


def announce(bundle: Bundle, options_digest: str | None = None) -> None:
    """What a run states first, on stderr: that a demo bundle means nothing, and the bundle's
    validation in one line (its measured accuracy, or that none is on record; and when it was measured
    under other options than this run's)."""
    warn_if_demo(bundle)
    click.echo(headline(bundle, options_digest), err=True)


def reason(exc: BaseException) -> str:
    """An error's message without OSError's "[Errno n]" prefix."""
    if isinstance(exc, OSError) and not isinstance(exc, Clue2GeoError) and exc.strerror:
        return exc.strerror
    return str(exc)


def check_trusted_keys(trusted_keys: tuple[str, ...], verify: bool) -> None:
    """--trusted-key without --verify is a usage error; a key file that is not a regular file is refused."""
    if trusted_keys and not verify:
        raise click.UsageError("--trusted-key needs --verify: the signature covers the manifest, the sha256s the files")
    key_files(trusted_keys, "--trusted-key")


def key_files(keys: tuple[str, ...], option: str) -> None:
    """Refuse a key given as a path that is not a regular file (a FIFO would block the read for ever)
    before anything opens it; key text (PEM, hex) names no file and passes."""
    for key in keys:
        try:
            named = "\n" not in key and os.path.lexists(key)
        except (OSError, ValueError):  # a NUL or an over-long name: key text, not a path
            named = False
        if named:
            try:
                regular_file(key, option)
            except Clue2GeoError as exc:
                fail(exc)


def same_file(dest: Path, *inputs: Path) -> bool:
    """Whether writing ``dest`` would write onto one of ``inputs`` (the same file by any name: a
    symlink or a hard link to it too)."""
    for src in inputs:
        try:
            if os.path.samefile(dest, src):
                return True
        except OSError:  # one of them does not exist (yet): not the same file
            continue
    return False


@contextlib.contextmanager
def progress(total: int | None) -> Iterator[Callable[[Record | Mapping[str, Any]], None]]:
    """A progress bar (images/s, ETA) and the per-record callback that advances it (``tick.set_total``
    sets a total learnt later)."""
    columns = (
        TextColumn("[bold]locating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("locate", total=total, rate="")

        def tick(record: Record | Mapping[str, Any]) -> None:
            bar.advance(task)
            t = bar.tasks[task]
            if t.elapsed:
                bar.update(task, rate=f"{t.completed / t.elapsed:.2f} img/s")
            rec = Record.of(record)
            if rec.status == "error":
                bar.console.print(f"[yellow]failed[/yellow] {rec.path}: {rec.message}")

        tick.set_total = lambda n: bar.update(task, total=n)  # type: ignore[attr-defined]
        yield tick
