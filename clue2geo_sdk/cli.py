"""The ``clue2geo`` command line. Flags carry the API's argument names."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from ._version import __version__
from .bundle import Bundle
from .errors import Clue2GeoError, MissingExtraError

# Commands that need the heavy export/train stacks are found by entry point at call time,
# so the runtime never imports them (DESIGN §1).
_PLUGIN_GROUP = "clue2geo.plugins"


def _plugin(name: str) -> Any:
    for ep in entry_points(group=_PLUGIN_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as exc:
                raise MissingExtraError(exc.name or "torch", "export", f"'clue2geo {name}'") from exc
    raise click.ClickException(f"no plugin {name!r} is installed; reinstall clue2geo with its [export] extra")


def _fail(exc: Exception) -> None:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


@click.group()
@click.version_option(__version__, prog_name="clue2geo")
def main() -> None:
    """clue2geo: offline photo geolocation (Clue2Geo method)."""


@main.group()
def bundle() -> None:
    """Inspect, verify and build bundles."""


@bundle.command("info")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--verify/--no-verify", default=False, help="Also check every file's sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def bundle_info(path: Path, verify: bool, as_json: bool) -> None:
    """Show a bundle's identity and components."""
    try:
        b = Bundle.open(path, verify=verify)
    except Clue2GeoError as exc:
        _fail(exc)
    info = b.info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"bundle {info['name']}  format {info['format_version']}  written by clue2geo {info['sdk_version']}")
    click.echo(f"path {info['path']}  created {info['created']}  demo={info['demo']}  {info['bytes'] / 1e6:.1f} MB")
    for comp in info["components"]:
        size = sum(f["bytes"] for f in comp["files"].values()) / 1e6
        flag = "  [random weights]" if comp["random_weights"] else ""
        click.echo(f"  {comp['role']:<9} {size:8.1f} MB  {', '.join(f['path'] for f in comp['files'].values())}{flag}")


@bundle.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
def bundle_verify(path: Path) -> None:
    """Check the manifest and every file's sha256; exit 0 when intact, 1 otherwise."""
    try:
        b = Bundle.open(path, verify=True)
    except Clue2GeoError as exc:
        _fail(exc)
    n = sum(len(c.files) for c in b.components.values())
    click.echo(f"ok: bundle {b.name!r}, {n} files verified")


@bundle.command("demo")
@click.argument("path", type=click.Path(path_type=Path), default=Path("artifacts/demo"))
@click.option("--seed", default=0, show_default=True, help="Seed for the random-weight stand-ins.")
@click.option("--overwrite/--no-overwrite", default=True, show_default=True)
def bundle_demo(path: Path, seed: int, overwrite: bool) -> None:
    """Build the demo bundle (real SBERT, GeoCLIP location tower, gallery; tiny random VLM/CLIP)."""
    try:
        build = _plugin("build-demo")
        build(path, seed=seed, overwrite=overwrite)
    except Clue2GeoError as exc:
        _fail(exc)
