"""``clue2geo eval``: the pipeline over a dataset with known positions, and the paper's metrics."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from ..errors import Clue2GeoError
from ..evaluation.metrics import read_dataset
from ..evaluation.run import run_eval, variants
from ..geolocator import Geolocator
from .common import EXIT_SOME_FAILED, announce, check_trusted_keys, fail, progress, warn
from .flags import LoadSettings, engine_flags, gallery_flag, options_flags, trusted_key_flag


@click.command("eval")
@click.option(
    "--dataset",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Metadata CSV with IMG_ID, LAT, LON (Im2GPS3k / YFCC4k form).",
)
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--bundle", "bundle_path", required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--ablate", default="", help="Comma list of ablations to add: cluemap,refinement.")
@click.option(
    "--limit", type=click.IntRange(1), default=None, help="Evaluate a deterministic random sample of N images."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the --limit sample.")
@gallery_flag
@engine_flags
@options_flags
@click.option("--verify/--no-verify", default=True, show_default=True)
@trusted_key_flag
@click.option(
    "--calibration",
    is_flag=True,
    help="Also write calibration.json / calibration.md: accuracy per bin of the winner's confidence.",
)
@click.option(
    "--calibration-bins", default=10, show_default=True, type=click.IntRange(1, 100), help="Equal-width bins."
)
def evaluate_cmd(
    dataset: Path,
    images: Path,
    bundle_path: Path,
    out: Path,
    ablate: str,
    limit: int | None,
    seed: int,
    gallery: Path | None,
    device: str,
    engine: str,
    max_in_flight: int,
    n_threads: int | None,
    verify: bool,
    trusted_keys: tuple[str, ...],
    calibration: bool,
    calibration_bins: int,
    **options: Any,
) -> None:
    """Run the pipeline over a dataset (resumable) and write per-image CSV, metrics.json and table.md
    (with --calibration, the reliability table of the confidence too); exit 0 if every image was
    located, 3 if some failed (they count as misses in the metrics)."""
    check_trusted_keys(trusted_keys, verify)
    abl = [a.strip() for a in ablate.split(",") if a.strip()]
    settings = LoadSettings.from_command(options)
    geo = _load(settings, abl)
    announce(geo.bundle, geo.options.digest())
    n = len(read_dataset(dataset, limit=limit, seed=seed)[0]) * (1 + len(abl))
    with geo, progress(n) as tick:
        report = run_eval(
            geo,
            dataset,
            images,
            out,
            ablate=abl,
            limit=limit,
            seed=seed,
            on_record=tick,
            on_notice=warn,
            calibration=calibration,
            calibration_bins=calibration_bins,
        )
    _print_outcome(out, report, calibration)


def _load(settings: LoadSettings, ablate: list[str]) -> Geolocator:
    """The Geolocator, once the ablations are known to exist (a bad name is refused before the load)."""
    try:
        variants(ablate)
        return settings.load()
    except (Clue2GeoError, ValueError) as exc:
        fail(exc)


def _print_outcome(out: Path, report: dict[str, Any], calibration: bool) -> None:
    """The table (and the calibration table), the files written, exit 3 when some images failed."""
    click.echo((out / "table.md").read_text())
    if calibration:
        click.echo((out / "calibration.md").read_text())
        click.echo(f"wrote {out}/calibration.json, calibration.md")
    failed = {k: len(v["failed"]) for k, v in report["variants"].items()}
    click.echo(f"wrote {out}/metrics.json, table.md, per-image-*.csv; failed images per variant: {failed}")
    if any(failed.values()):
        sys.exit(EXIT_SOME_FAILED)
