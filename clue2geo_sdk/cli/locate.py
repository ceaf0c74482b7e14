"""``clue2geo locate``: images and folders into a results file on this machine, or into a run folder
on a Ray cluster (``--ray``); with ``--report``, the case report of what was written."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import click

from ..bundle.manifest import Bundle
from ..cluster import locate_on_ray, merged_records
from ..errors import Clue2GeoError
from ..evidence.report.render import write_report
from ..geolocator import Geolocator
from ..inputs.discover import discover
from ..runs.batch import BatchSummary, run_batch
from ..runs.journal import check_not_in_use, journal_path, read_journal
from ..runs.records import EXTRA_HASHES, Record
from ..runs.resume import latest_records
from .common import EXIT_SOME_FAILED, announce, check_trusted_keys, fail, progress, reason, same_file, warn
from .flags import F, LoadSettings, engine_flags, gallery_flag, options_flags, trusted_key_flag

RAY_HELP = (
    "Run on a Ray cluster (the cluster extra): --out is then a folder of shards and results.jsonl. "
    "ADDRESS: host:port, 'auto' or 'local' (default: RAY_ADDRESS, the cluster 'ray start' made, else a new local one)."
)


@attrs.frozen(kw_only=True)
class Job:
    """What to locate and where the records (and the report) go."""

    paths: tuple[Path, ...]
    out: Path
    fmt: str | None
    recursive: bool
    resume: bool
    retry_failed: bool
    report: Path | None
    hashes: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class RaySettings:
    """``--ray [ADDRESS]``, ``--actors``, ``--batch-size``."""

    address: str
    actors: int | None
    batch_size: int | None


def job_flags(f: F) -> F:
    """PATHS, --bundle, --out, --format and the resume flags."""
    for option in reversed(
        (
            click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path)),
            click.option(
                "--bundle", "bundle_path", required=True, type=click.Path(path_type=Path), help="Bundle directory."
            ),
            click.option(
                "--out", required=True, type=click.Path(path_type=Path), help="Results file (appended per image)."
            ),
            click.option(
                "--format",
                "fmt",
                type=click.Choice(["jsonl", "csv", "geojson"]),
                default=None,
                help="Output format (default: from --out's suffix, else jsonl).",
            ),
            click.option("--recursive", "-r", is_flag=True, help="Descend into sub-folders."),
            click.option(
                "--resume",
                is_flag=True,
                help="Skip images already in --out (same path, sha256, bundle and options); run the rest.",
            ),
            click.option(
                "--retry-failed", is_flag=True, help="With --resume: also run again images whose latest record failed."
            ),
            click.option(
                "--hash",
                "hashes",
                multiple=True,
                type=click.Choice(["sha256", *EXTRA_HASHES]),
                help="Also record this digest of each input (sha3-512: 'image_sha3_512', from the same bytes as the "
                "sha256, which is always recorded); repeatable. Images a --resume skips keep what they hold.",
            ),
        )
    ):
        f = option(f)
    return f


def ray_flags(f: F) -> F:
    """--ray [ADDRESS], --actors, --batch-size."""
    f = click.option(
        "--batch-size",
        type=click.IntRange(1),
        default=None,
        help="With --ray: images per actor call (default 2 x --in-flight).",
    )(f)
    f = click.option(
        "--actors",
        type=click.IntRange(1),
        default=None,
        help="With --ray: actors (default: one per GPU, else per node).",
    )(f)
    ray = click.option(
        "--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]", help=RAY_HELP
    )
    return ray(f)


@click.command("locate")
@job_flags
@gallery_flag
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the HTML case report.")
@engine_flags
@options_flags
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the bundle's sha256 digests first.")
@trusted_key_flag
@click.option("--verbose", is_flag=True, help="Show llama.cpp's native logs.")
@ray_flags
def locate(
    paths: tuple[Path, ...],
    bundle_path: Path,
    out: Path,
    fmt: str | None,
    recursive: bool,
    resume: bool,
    retry_failed: bool,
    hashes: tuple[str, ...],
    gallery: Path | None,
    report: Path | None,
    device: str,
    engine: str,
    max_in_flight: int,
    n_threads: int | None,
    verify: bool,
    trusted_keys: tuple[str, ...],
    verbose: bool,
    ray_address: str | None,
    actors: int | None,
    batch_size: int | None,
    **options: Any,
) -> None:
    """Geolocate images and folders into --out; exit 0 if all succeeded, 3 if some failed.

    With --ray, PATHS may also be one .csv or .parquet manifest with a 'path' column."""
    if retry_failed and not resume:
        raise click.UsageError("--retry-failed runs again the failures recorded in --out; pass --resume with it")
    check_trusted_keys(trusted_keys, verify)
    job = Job(
        paths=paths,
        out=out,
        fmt=fmt,
        recursive=recursive,
        resume=resume,
        retry_failed=retry_failed,
        report=report,
        hashes=tuple(dict.fromkeys(hashes)),
    )
    load = LoadSettings.from_command(options)
    if ray_address is not None:
        if set(job.hashes) - {"sha256"}:
            raise click.UsageError("--hash sha3-512 is recorded by local runs only, not yet with --ray")
        if n_threads is not None:
            raise click.UsageError("--threads is for local runs; Ray actors keep the default")
        run_on_ray(job, load, RaySettings(address=ray_address, actors=actors, batch_size=batch_size))
    else:
        run_local(job, load)


def run_local(job: Job, load: LoadSettings) -> None:
    """``locate`` on this machine: --out checked before the model loads, the batch, the report."""
    fmt = job.fmt or {".csv": "csv", ".geojson": "geojson"}.get(job.out.suffix.lower(), "jsonl")
    journal = _check_out(job.out, fmt, job.report)
    inputs = list(discover(job.paths, recursive=job.recursive))
    try:
        geo = load.load()
    except (Clue2GeoError, TypeError, RuntimeError) as exc:
        fail(exc)
    announce(geo.bundle, geo.options.digest())
    summary = _run_batch(geo, inputs, job, fmt)
    if job.report is not None:
        recs = latest_records(read_journal(journal).records).values()
        _write_report(job.report, lambda: recs, geo.bundle, journal, load.trusted_keys)
    _finish(summary, job.report, f"(already in {job.out})")


def _check_out(out: Path, fmt: str, report: Path | None) -> Path:
    """The journal --out is written through, refused when it is a folder, the report's own path, or in
    use by another run (before the model loads; run_batch holds the lock itself)."""
    if out.is_dir():
        fail(
            f"--out {out} is a folder; pass a results file such as {out / 'results.jsonl'} "
            "(a folder is for a --ray run)"
        )
    journal = journal_path(out, fmt)  # type: ignore[arg-type]
    if report is not None and same_file(report, out, journal):
        fail(f"--report {report} is the results file; pass another path for the HTML report")
    try:
        check_not_in_use(journal)
    except Clue2GeoError as exc:
        fail(exc)
    return journal


def _run_batch(geo: Geolocator, inputs: list[Any], job: Job, fmt: str) -> BatchSummary:
    try:
        with geo, progress(len(inputs)) as tick:
            return run_batch(
                geo,
                inputs,
                job.out,
                fmt=fmt,  # type: ignore[arg-type]
                resume=job.resume,
                retry_failed=job.retry_failed,
                on_record=tick,
                on_notice=warn,
                hashes=job.hashes,
            )
    except (Clue2GeoError, FileExistsError) as exc:  # another writer, a full disk, results already there
        fail(exc)


def run_on_ray(job: Job, load: LoadSettings, ray: RaySettings) -> None:
    """``locate --ray``: the same job on a Ray cluster (clue2geo_sdk.cluster), into the folder --out. The
    bundle is opened here once, for the demo warning and the report; with --trusted-key its signature
    and digests are checked here (the actors check the digests on their node)."""
    try:
        if load.trusted_keys:
            bundle = Bundle.open(load.bundle_path, verify=True, trusted_keys=load.trusted_keys)
        else:
            bundle = Bundle.open(load.bundle_path, verify=False)
    except Clue2GeoError as exc:
        fail(exc)
    announce(bundle)
    summary = _run_ray_job(job, load, ray)
    if job.report is not None:
        _write_report(job.report, lambda: merged_records(job.out).records, bundle, job.out, load.trusted_keys)
    plan = summary.plan
    _finish(
        summary,
        job.report,
        f"(already in {job.out}) on {plan.get('actors')} {plan.get('device')} actor(s); merged: {summary.merged}",
    )


def _run_ray_job(job: Job, load: LoadSettings, ray: RaySettings) -> Any:
    try:
        with progress(None) as tick:
            return locate_on_ray(
                job.paths,
                load.bundle_path,
                job.out,
                on_total=tick.set_total,  # type: ignore[attr-defined]
                on_record=tick,
                on_notice=warn,
                address=ray.address or None,
                actors=ray.actors,
                batch_size=ray.batch_size,
                engine=load.engine,
                gallery=load.gallery,
                recursive=job.recursive,
                resume=job.resume,
                retry_failed=job.retry_failed,
                fmt=job.fmt or "jsonl",
                in_flight=load.max_in_flight,
                device=load.device,
                verify=load.verify,
                verbose=load.verbose,
                **load.options,
            )
    except (Clue2GeoError, FileExistsError, TypeError) as exc:
        fail(exc)
    except KeyboardInterrupt:
        click.secho(f"stopped; the records written so far are in {job.out}: run again with --resume", err=True)
        sys.exit(130)


def _write_report(
    report: Path,
    records: Callable[[], Iterable[Record | Mapping[str, Any]]],
    bundle: Bundle,
    results_path: Path,
    trusted_keys: tuple[str, ...],
) -> None:
    """The case report of the records ``records()`` reads (a read error is reported as the report's)."""
    try:
        write_report(report, records(), bundle, results_path=results_path, trusted_keys=trusted_keys or None)
    except Clue2GeoError as exc:
        fail(exc)
    except OSError as exc:
        fail(f"cannot write the report {report}: {reason(exc)}")


def _finish(summary: Any, report: Path | None, where: str) -> None:
    """The summary line, the report's path, exit 3 when some images failed."""
    click.echo(f"{summary.ok} located, {summary.error} failed, {summary.skipped} skipped {where}")
    if report is not None:
        click.echo(f"report: {report}")
    if summary.error:
        sys.exit(EXIT_SOME_FAILED)
