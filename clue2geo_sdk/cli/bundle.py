"""``clue2geo bundle``: inspect, verify, sign and build bundles."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import get_args

import click

from ..bundle.attach import attach
from ..bundle.manifest import Bundle
from ..bundle.signing import generate_keypair, load_public_key, public_bytes, read_signatures, sign_bundle
from ..bundle.validation import load_report, summary_line
from ..engines.encoders import Device
from ..errors import Clue2GeoError
from ..evaluation.selftest import SelftestResult, read_known_answers, run_selftest
from .common import fail, key_files, progress
from .flags import trusted_key_flag
from .plugins import plugin


@click.group()
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
        fail(exc)
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
@trusted_key_flag
def bundle_verify(path: Path, trusted_keys: tuple[str, ...]) -> None:
    """Check the manifest and every file's sha256 (and, with --trusted-key, the bundle's signature);
    exit 0 when intact, 1 otherwise."""
    key_files(trusted_keys, "--trusted-key")
    try:
        b = Bundle.open(path, verify=True, trusted_keys=trusted_keys or None)
        sigs = read_signatures(b.root)
    except Clue2GeoError as exc:
        fail(exc)
    n = sum(len(c.files) for c in b.components.values())
    click.echo(f"ok: bundle {b.name!r}, {n} files verified (manifest sha256 {b.digest})")
    if b.signed_by:
        click.echo(f"ok: signed by trusted key(s) {', '.join(b.signed_by)}")
    elif sigs:
        ids = ", ".join(f"{x.key_id} ({x.signed_utc})" for x in sigs)
        click.echo(f"signatures by key(s) {ids} not checked: pass --trusted-key")
    else:
        click.echo("unsigned (sign with 'clue2geo bundle sign')")


@bundle.command("sign")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, help="Ed25519 private key (PEM or 64 hex, or its file).")
def bundle_sign(path: Path, key: str) -> None:
    """Check every file's sha256, then sign the bundle's manifest digest into PATH/signatures.json
    (a signature by the same key is replaced, others are kept)."""
    key_files((key,), "--key")
    try:
        b = Bundle.open(path, verify=True)
        sig = sign_bundle(b.root, key, b.digest)
    except Clue2GeoError as exc:
        fail(exc)
    click.echo(f"signed bundle {b.name!r} (manifest sha256 {sig.manifest_sha256}) with key {sig.key_id}")


@bundle.command("attach-validation")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("report_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def bundle_attach_validation(path: Path, report_dir: Path) -> None:
    """Add REPORT_DIR's validation.json (and validation.html) from 'clue2geo validate' to the bundle's
    manifest, so it is verified and signed with the bundle; refused when it measured other models."""
    files = {"report": report_dir / "validation.json"}
    if (report_dir / "validation.html").is_file():
        files["page"] = report_dir / "validation.html"
    try:
        b = Bundle.open(path, verify=True)
        data = load_report(files["report"])
        signed = read_signatures(b.root)
        b = attach(b, "validation", files, params={"models_digest": data["bundle"]["models_digest"]})
    except (Clue2GeoError, OSError, ValueError) as exc:
        fail(exc)
    click.echo(f"attached to bundle {b.name!r} (manifest sha256 now {b.digest}): {summary_line(data)}")
    if signed:
        click.echo("the manifest changed: its signatures no longer cover it; sign it again with 'clue2geo bundle sign'")


@bundle.command("selftest")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check every file's sha256 first; with --no-verify the re-run answers alone must show a changed model.",
)
@trusted_key_flag
@click.option(
    "--device",
    type=click.Choice(list(get_args(Device))),
    default=None,
    help="Default: the device the known answers were made on (another may differ by more than float noise).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bundle_selftest(path: Path, verify: bool, trusted_keys: tuple[str, ...], device: str | None, as_json: bool) -> None:
    """Re-run the bundle's known-answer set (a few photos and the records it made for them) and compare
    the photos' digests, the winners, the candidates and ranked answers (within a stated tolerance) and
    the models digest; exit 0 when all match, 1 with each difference named."""
    key_files(trusted_keys, "--trusted-key")
    if trusted_keys and not verify:
        fail("--trusted-key needs --verify: the signature covers the manifest, only the sha256 check ties the files")
    try:
        n = len(read_known_answers(Bundle.open(path, verify=False))[1])
        with progress(n) if n > 2 else contextlib.nullcontext(None) as tick:
            result = run_selftest(path, verify=verify, trusted_keys=trusted_keys or None, device=device, on_record=tick)
    except Clue2GeoError as exc:
        fail(exc)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_selftest(result)
    sys.exit(0 if result.passed else 1)


def _print_selftest(result: SelftestResult) -> None:
    """The verdict per photo, then every difference, one per line."""

    def at(pos: tuple[float, float] | None) -> str:
        return "none" if pos is None else f"{pos[0]:.6f},{pos[1]:.6f}"

    for p in result.photos:
        verdict = "ok" if not p.mismatches else "DIFFERS"
        click.echo(f"  {p.photo}: {verdict}  winner {at(p.got)} (recorded {at(p.expected)})")
    head = f"bundle {result.bundle!r}, {len(result.photos)} photo(s), tolerance {result.tolerance_deg:g} degrees"
    if result.passed:
        click.secho(f"ok: {head}: every answer as recorded (models digest {result.models_digest})", fg="green")
        return
    click.secho(f"FAILED: {head}: {len(result.mismatches)} difference(s)", fg="red", err=True)
    for m in result.mismatches:
        click.echo(f"  {m}", err=True)


@bundle.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path))
@click.option("--pub", "public_key", type=click.Path(path_type=Path), default=None, help="Default: PRIVATE_KEY.pub.")
def bundle_keygen(private_key: Path, public_key: Path | None) -> None:
    """Write a new Ed25519 key pair: PRIVATE_KEY (PEM, unencrypted, mode 0600: keep it off the evidence
    workstation) and its public key (PEM), which analysts pass as --trusted-key."""
    try:
        priv, pub, kid = generate_keypair(private_key, public_key)
    except Clue2GeoError as exc:
        fail(exc)
    click.echo(f"key {kid}: private {priv}, public {pub} (hex {public_bytes(load_public_key(pub)).hex()})")


@bundle.command("demo")
@click.argument("path", type=click.Path(path_type=Path), default=Path("artifacts/demo"))
@click.option("--seed", default=0, show_default=True, help="Seed for the random-weight stand-ins.")
@click.option(
    "--overwrite/--no-overwrite",
    default=False,
    show_default=True,
    help="Replace a bundle already in PATH (only its own files; a folder holding anything else is refused).",
)
def bundle_demo(path: Path, seed: int, overwrite: bool) -> None:
    """Build the demo bundle (real SBERT, GeoCLIP location tower, gallery; tiny random VLM/CLIP).

    PATH must be new or empty, or (with --overwrite) hold only a previous bundle."""
    try:
        build = plugin("build-demo")
        build(path, seed=seed, overwrite=overwrite)
    except Clue2GeoError as exc:
        fail(exc)


@bundle.command("synth")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--shape", type=click.Choice(["tiny", "3b", "7b"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed for the random weights.")
@click.option("--overwrite/--no-overwrite", default=False, show_default=True, help="Replace a bundle already in PATH.")
@click.option(
    "--external-data-above",
    type=click.IntRange(0),
    default=None,
    help="ONNX towers with more weight bytes than this get a .data file (default: just under 2 GiB).",
)
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="Scratch folder (default: beside PATH).")
def bundle_synth(
    path: Path, shape: str, seed: int, overwrite: bool, external_data_above: int | None, workdir: Path | None
) -> None:
    """Build a bundle with random weights at the published shapes (Qwen2.5-VL-3B/7B, ViT-H-14, ViT-L/14)
    through the real-weights exporters. Its predictions are meaningless: it proves size and plumbing."""
    try:
        build = plugin("build-synth")
        build(
            path, shape=shape, seed=seed, overwrite=overwrite, external_data_above=external_data_above, workdir=workdir
        )
    except Clue2GeoError as exc:
        fail(exc)
