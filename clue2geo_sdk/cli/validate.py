"""``clue2geo validate``: a bundle's known error rates on an eval set (validation.json + validation.html)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..bundle.validation import summary_line
from ..errors import Clue2GeoError
from ..evaluation.evalset import EvalSet, read_evalset
from ..evaluation.validation import ValidationSettings, run_validation
from ..evaluation.validation_stats import DEFAULT_MIN_GROUP, DEFAULT_RESAMPLES, DEFAULT_SEED
from ..evidence.validation_page import write_validation_page
from .common import EXIT_SOME_FAILED, check_trusted_keys, fail, progress, warn, warn_if_demo
from .flags import LoadSettings, engine_flags, gallery_flag, options_flags, trusted_key_flag


@click.command("validate")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.argument("evalset", type=click.Path(exists=True, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="For an IMG_ID,LAT,LON CSV (the eval form): the folder its IMG_IDs are in (default: the CSV's folder).",
)
@click.option("--name", default=None, help="The eval set's name in the report (default: the folder or CSV name).")
@click.option("--bootstrap", "resamples", default=DEFAULT_RESAMPLES, show_default=True, type=click.IntRange(100))
@click.option("--seed", default=DEFAULT_SEED, show_default=True, help="Seed of the bootstrap resamples.")
@click.option(
    "--min-group",
    default=DEFAULT_MIN_GROUP,
    show_default=True,
    type=click.IntRange(1),
    help="Smallest continent / country reported on its own; smaller ones are listed with their size.",
)
@click.option("--calibration-bands", "bands", default=5, show_default=True, type=click.IntRange(1, 20))
@gallery_flag
@engine_flags
@options_flags
@click.option("--verify/--no-verify", default=True, show_default=True)
@trusted_key_flag
def validate_cmd(
    bundle_path: Path,
    evalset: Path,
    out: Path,
    images: Path | None,
    name: str | None,
    resamples: int,
    seed: int,
    min_group: int,
    bands: int,
    gallery: Path | None,
    device: str,
    engine: str,
    max_in_flight: int,
    n_threads: int | None,
    verify: bool,
    trusted_keys: tuple[str, ...],
    **options: Any,
) -> None:
    """Run BUNDLE over EVALSET (a folder of geotagged photos, or a CSV path,lat,lon / IMG_ID,LAT,LON) and
    write validation.json and validation.html: accuracy with 95 % bootstrap intervals, per continent and
    country, calibration, limitations and what reproduces it. Resumable. Exit 0 if every image was
    located, 3 if some failed (they count as misses). Attach it with 'clue2geo bundle attach-validation'."""
    check_trusted_keys(trusted_keys, verify)
    es = _read_set(evalset, images, name)
    settings = LoadSettings.from_command(options)
    how = ValidationSettings(
        resamples=resamples,
        seed=seed,
        min_group=min_group,
        bands=bands,
        engine=engine,
        device=device,
        in_flight=max_in_flight,
    )
    try:
        geo = settings.load()
    except Clue2GeoError as exc:
        fail(exc)
    warn_if_demo(geo.bundle)
    try:
        with geo, progress(len(es.items)) as tick:
            report = run_validation(geo, es, out, settings=how, on_record=tick, on_notice=warn)
        page = write_validation_page(out / "validation.html", report)
    except (Clue2GeoError, OSError) as exc:  # e.g. another validate writing the same --out
        fail(exc)
    _print_outcome(out, report, page)


def _read_set(evalset: Path, images: Path | None, name: str | None) -> EvalSet:
    """The eval set, read before any model loads; what is left out of it said one line each."""
    try:
        es = read_evalset(evalset, images=images, name=name)
    except (Clue2GeoError, OSError) as exc:
        fail(exc)
    if not es.items:
        fail(f"{evalset}: no photo with a known position to validate on ({len(es.excluded)} left out)")
    for path, why in es.excluded:
        warn(f"{path}: left out: {why}")
    return es


def _print_outcome(out: Path, report: dict[str, Any], page: Path) -> None:
    """The headline, the files written; exit 3 when some images failed."""
    click.echo(summary_line(report))
    click.echo(f"wrote {out / 'validation.json'}, {page}, {out / 'per-image.csv'}, {out / 'predictions.jsonl'}")
    if report["n_failed"]:
        click.echo(f"{report['n_failed']} of {report['n']} images failed (counted as misses)", err=True)
        sys.exit(EXIT_SOME_FAILED)
