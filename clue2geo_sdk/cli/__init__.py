"""The ``clue2geo`` command line. Flags carry the API's argument names."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from ..bundle.manifest import Bundle
from ..errors import Clue2GeoError, MissingExtraError, install_hint
from .doctor import doctor_cmd

# Commands that need the heavy export/train stacks are found by entry point at call time,
# so the runtime never imports them (DESIGN §1).
_PLUGIN_GROUP = "clue2geo.plugins"


def _plugin(name: str) -> Any:
    extra = "train" if name == "train" else "export"
    for ep in entry_points(group=_PLUGIN_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as exc:
                raise MissingExtraError(exc.name or "torch", extra, f"'clue2geo {name}'") from exc
    raise click.ClickException(f"no plugin {name!r} is installed; reinstall clue2geo: {install_hint(extra)}")


def _fail(exc: Exception) -> None:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


class _LazyPluginGroup(click.Group):
    """A command group whose commands live in a plugin and are imported only when one is run."""

    def __init__(self, name: str, plugin: str, commands: tuple[str, ...], help: str) -> None:
        super().__init__(name=name, help=help)
        self._plugin_name, self._names = plugin, commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self._names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._names:
            return None
        try:
            return _plugin(self._plugin_name).get_command(ctx, cmd_name)
        except MissingExtraError as exc:
            _fail(exc)
        return None


@click.group()
@click.version_option(__version__, prog_name="clue2geo")
def main() -> None:
    """clue2geo: offline photo geolocation (Clue2Geo method)."""


main.add_command(doctor_cmd)
main.add_command(
    _LazyPluginGroup(
        "train",
        "train",
        ("dataset", "run", "export"),
        "Build the fine-tuning data, train the three LoRA stages, export a bundle.",
    )
)


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


_TRUSTED_KEY_HELP = (
    "Ed25519 public key (PEM, 'ssh-ed25519' line or 64 hex, or its file) the bundle must be signed by; repeatable."
)


def _check_trusted_keys(trusted_keys: tuple[str, ...], verify: bool) -> None:
    if trusted_keys and not verify:
        raise click.UsageError("--trusted-key needs --verify: the signature covers the manifest, the sha256s the files")
    _key_files(trusted_keys, "--trusted-key")


def _key_files(keys: tuple[str, ...], option: str) -> None:
    """Refuse a key given as a path that is not a regular file (a FIFO would block the read for ever)
    before anything opens it; key text (PEM, hex) names no file and passes."""
    from ..files import regular_file

    for key in keys:
        try:
            named = "\n" not in key and os.path.lexists(key)
        except (OSError, ValueError):  # a NUL or an over-long name: key text, not a path
            named = False
        if named:
            try:
                regular_file(key, option)
            except Clue2GeoError as exc:
                _fail(exc)


@bundle.command("verify")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--trusted-key", "trusted_keys", multiple=True, help=_TRUSTED_KEY_HELP)
def bundle_verify(path: Path, trusted_keys: tuple[str, ...]) -> None:
    """Check the manifest and every file's sha256 (and, with --trusted-key, the bundle's signature);
    exit 0 when intact, 1 otherwise."""
    from ..bundle.signing import read_signatures

    _key_files(trusted_keys, "--trusted-key")
    try:
        b = Bundle.open(path, verify=True, trusted_keys=trusted_keys or None)
        sigs = read_signatures(b.root)
    except Clue2GeoError as exc:
        _fail(exc)
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
    from ..bundle.signing import sign_bundle

    _key_files((key,), "--key")
    try:
        b = Bundle.open(path, verify=True)
        sig = sign_bundle(b.root, key, b.digest)
    except Clue2GeoError as exc:
        _fail(exc)
    click.echo(f"signed bundle {b.name!r} (manifest sha256 {sig.manifest_sha256}) with key {sig.key_id}")


@bundle.command("keygen")
@click.argument("private_key", type=click.Path(path_type=Path))
@click.option("--pub", "public_key", type=click.Path(path_type=Path), default=None, help="Default: PRIVATE_KEY.pub.")
def bundle_keygen(private_key: Path, public_key: Path | None) -> None:
    """Write a new Ed25519 key pair: PRIVATE_KEY (PEM, unencrypted, mode 0600: keep it off the evidence
    workstation) and its public key (PEM), which analysts pass as --trusted-key."""
    from ..bundle.signing import generate_keypair, load_public_key, public_bytes

    try:
        priv, pub, kid = generate_keypair(private_key, public_key)
    except Clue2GeoError as exc:
        _fail(exc)
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
        build = _plugin("build-demo")
        build(path, seed=seed, overwrite=overwrite)
    except Clue2GeoError as exc:
        _fail(exc)


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
        build = _plugin("build-synth")
        build(
            path, shape=shape, seed=seed, overwrite=overwrite, external_data_above=external_data_above, workdir=workdir
        )
    except Clue2GeoError as exc:
        _fail(exc)


EXIT_SOME_FAILED = 3
DEMO_WARNING = (
    "warning: bundle {name!r} has random-weight parts (a demo bundle): its predictions are meaningless; "
    "it shows the plumbing only"
)


def _warn(msg: str) -> None:
    click.secho(msg, fg="yellow", err=True)


def _warn_if_demo(bundle: Bundle) -> None:
    """One line on stderr when the bundle's predictions mean nothing, so no one takes them for real."""
    if bundle.demo:
        _warn(DEMO_WARNING.format(name=bundle.name))


@contextlib.contextmanager
def _progress(total: int | None) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar (images/s, ETA) and the per-record callback that advances it (``tick.set_total``
    sets a total learnt later)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[bold]locating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("locate", total=total, rate="")

        def tick(rec: dict[str, Any]) -> None:
            progress.advance(task)
            t = progress.tasks[task]
            if t.elapsed:
                progress.update(task, rate=f"{t.completed / t.elapsed:.2f} img/s")
            if rec["status"] == "error":
                progress.console.print(f"[yellow]failed[/yellow] {rec['path']}: {rec.get('message')}")

        tick.set_total = lambda n: progress.update(task, total=n)  # type: ignore[attr-defined]
        yield tick


def _engine_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--engine and --in-flight, shared by the commands that run the pipeline."""
    f = click.option(
        "--in-flight",
        "max_in_flight",
        default=4,
        show_default=True,
        type=click.IntRange(1),
        help="Images in the engine at once (each reserves its KV cache).",
    )(f)
    return click.option(
        "--engine",
        type=click.Choice(["batched", "chat"]),
        default="batched",
        show_default=True,
        help="VLM engine: batched (shared image prefix, many images at once) or the chat-handler baseline.",
    )(f)


@main.command("locate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--bundle", "bundle_path", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Results file (appended per image).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "geojson"]),
    default=None,
    help="Output format (default: from --out's suffix, else jsonl).",
)
@click.option("--recursive", "-r", is_flag=True, help="Descend into sub-folders.")
@click.option(
    "--resume",
    is_flag=True,
    help="Skip images already in --out (same path, sha256, bundle and options); run the rest.",
)
@click.option("--retry-failed", is_flag=True, help="With --resume: also run again images whose latest record failed.")
@click.option(
    "--gallery",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Reference gallery of your own geotagged photos (clue2geo gallery build) instead of the bundle's.",
)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the HTML case report.")
@_engine_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--use-cluemap/--no-use-cluemap", default=True, show_default=True, help="Off: the paper's w/o CM.")
@click.option("--use-refinement/--no-use-refinement", default=True, show_default=True, help="Off: the paper's w/o CR.")
@click.option("--samples-per-prompt", default=1, show_default=True, type=click.IntRange(1))
@click.option("--nearest-neighbour-candidate", is_flag=True, help="Add the nearest gallery coordinate as a candidate.")
@click.option("--constrain", type=click.Choice(["fallback", "always", "never"]), default="always", show_default=True)
@click.option(
    "--region",
    default=None,
    help="Where the photo is known to be: ISO codes 'FR,DE', 'bbox:WEST,SOUTH,EAST,NORTH', 'circle:LAT,LON,KM' "
    "or 'geojson:AREA.geojson' (a Polygon or MultiPolygon in WGS84 lon/lat).",
)
@click.option("--max-cue-tokens", default=512, show_default=True, type=click.IntRange(16))
@click.option("--max-answer-tokens", default=128, show_default=True, type=click.IntRange(16))
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check the bundle's sha256 digests first.")
@click.option("--trusted-key", "trusted_keys", multiple=True, help=_TRUSTED_KEY_HELP)
@click.option("--verbose", is_flag=True, help="Show llama.cpp's native logs.")
@click.option(
    "--ray",
    "ray_address",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[ADDRESS]",
    help="Run on a Ray cluster (the cluster extra): --out is then a folder of shards and results.jsonl. "
    "ADDRESS: host:port, 'auto' or 'local' (default: RAY_ADDRESS, the cluster 'ray start' made, else a new local one).",
)
@click.option(
    "--actors", type=click.IntRange(1), default=None, help="With --ray: actors (default: one per GPU, else per node)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="With --ray: images per actor call (default 2 x --in-flight).",
)
def locate(
    paths: tuple[Path, ...],
    bundle_path: Path,
    out: Path,
    fmt: str | None,
    recursive: bool,
    resume: bool,
    retry_failed: bool,
    report: Path | None,
    device: str,
    engine: str,
    max_in_flight: int,
    verify: bool,
    verbose: bool,
    ray_address: str | None,
    actors: int | None,
    batch_size: int | None,
    trusted_keys: tuple[str, ...],
    **options: Any,
) -> None:
    """Geolocate images and folders into --out; exit 0 if all succeeded, 3 if some failed.

    With --ray, PATHS may also be one .csv or .parquet manifest with a 'path' column."""
    from ..geolocator import Geolocator
    from ..inputs.discover import discover
    from ..runs.batch import check_not_in_use, journal_path, latest, read_journal, run_batch

    if retry_failed and not resume:
        raise click.UsageError("--retry-failed runs again the failures recorded in --out; pass --resume with it")
    _check_trusted_keys(trusted_keys, verify)
    if trusted_keys and ray_address is not None:  # the driver checks the signature; actors check the digest
        try:
            Bundle.open(bundle_path, verify=True, trusted_keys=trusted_keys)
        except Clue2GeoError as exc:
            _fail(exc)
    gallery = options.pop("gallery", None)
    if ray_address is not None:
        ray_args = {"address": ray_address or None, "actors": actors, "batch_size": batch_size, "engine": engine}
        ray_args |= {"gallery": gallery}
        ray_args |= {"recursive": recursive, "resume": resume, "retry_failed": retry_failed, "fmt": fmt or "jsonl"}
        ray_args |= {"in_flight": max_in_flight, "device": device, "verify": verify, "verbose": verbose}
        _locate_on_ray(paths, bundle_path, out, report, ray_args, options, trusted_keys)
        return
    fmt = fmt or {".csv": "csv", ".geojson": "geojson"}.get(out.suffix.lower(), "jsonl")
    if out.is_dir():
        _fail(
            f"--out {out} is a folder; pass a results file such as {out / 'results.jsonl'} "
            "(a folder is for a --ray run)"
        )
    if report is not None and _same_file(report, out, journal_path(out, fmt)):  # type: ignore[arg-type]
        _fail(f"--report {report} is the results file; pass another path for the HTML report")
    try:  # another run writing --out: refused before the model loads (run_batch holds the lock itself)
        check_not_in_use(journal_path(out, fmt))  # type: ignore[arg-type]
    except Clue2GeoError as exc:
        _fail(exc)
    inputs = list(discover(paths, recursive=recursive))
    try:
        geo = Geolocator.load(
            bundle_path,
            device=device,
            verify=verify,
            verbose=verbose,
            engine=engine,  # type: ignore[arg-type]
            max_in_flight=max_in_flight,
            trusted_keys=trusted_keys or None,
            gallery=gallery,
            **options,
        )
    except (Clue2GeoError, TypeError, RuntimeError) as exc:
        _fail(exc)
    _warn_if_demo(geo.bundle)
    try:
        with geo, _progress(len(inputs)) as tick:
            summary = run_batch(
                geo,
                inputs,
                out,
                fmt=fmt,  # type: ignore[arg-type]
                resume=resume,
                retry_failed=retry_failed,
                on_record=tick,
                on_notice=_warn,
            )
    except (Clue2GeoError, FileExistsError) as exc:  # another writer, a full disk, results already there
        _fail(exc)
    if report is not None:
        from ..evidence.report.render import write_report

        journal = journal_path(out, fmt)  # type: ignore[arg-type]
        recs = latest(read_journal(journal).records).values()
        try:
            write_report(report, recs, geo.bundle, results_path=journal, trusted_keys=trusted_keys or None)
        except Clue2GeoError as exc:
            _fail(exc)
        except OSError as exc:
            _fail(f"cannot write the report {report}: {_reason(exc)}")
    click.echo(f"{summary.ok} located, {summary.error} failed, {summary.skipped} skipped (already in {out})")
    if report is not None:
        click.echo(f"report: {report}")
    if summary.error:
        sys.exit(EXIT_SOME_FAILED)


def _locate_on_ray(
    paths: tuple[Path, ...],
    bundle_path: Path,
    out: Path,
    report: Path | None,
    ray_args: dict[str, Any],
    options: dict[str, Any],
    trusted_keys: tuple[str, ...] = (),
) -> None:
    """``locate --ray``: the same job on a Ray cluster (clue2geo_sdk.cluster), into the folder --out."""
    from ..cluster import locate_on_ray

    try:
        _warn_if_demo(Bundle.open(bundle_path, verify=False))
        with _progress(None) as tick:
            summary = locate_on_ray(
                paths,
                bundle_path,
                out,
                on_total=tick.set_total,  # type: ignore[attr-defined]
                on_record=tick,
                on_notice=_warn,
                **ray_args,
                **options,
            )
    except (Clue2GeoError, FileExistsError, TypeError) as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.secho(f"stopped; the records written so far are in {out}: run again with --resume", err=True)
        sys.exit(130)
    if report is not None:
        from ..cluster import merged_records
        from ..evidence.report.render import write_report

        try:
            write_report(
                report,
                merged_records(out).records,
                Bundle.open(bundle_path, verify=False),
                results_path=out,
                trusted_keys=trusted_keys or None,
            )
        except Clue2GeoError as exc:
            _fail(exc)
        except OSError as exc:
            _fail(f"cannot write the report {report}: {_reason(exc)}")
    click.echo(
        f"{summary.ok} located, {summary.error} failed, {summary.skipped} skipped (already in {out}) "
        f"on {summary.plan.get('actors')} {summary.plan.get('device')} actor(s); merged: {summary.merged}"
    )
    if report is not None:
        click.echo(f"report: {report}")
    if summary.error:
        sys.exit(EXIT_SOME_FAILED)


def _reason(exc: BaseException) -> str:
    """An error's message without OSError's "[Errno n]" prefix."""
    if isinstance(exc, OSError) and not isinstance(exc, Clue2GeoError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _same_file(dest: Path, *inputs: Path) -> bool:
    """Whether writing ``dest`` would write onto one of ``inputs`` (the same file by any name: a
    symlink or a hard link to it too)."""
    for src in inputs:
        try:
            if os.path.samefile(dest, src):
                return True
        except OSError:  # one of them does not exist (yet): not the same file
            continue
    return False


def _inputs_of(records: Path) -> list[Path]:
    """The files a results argument is read from: the journal, or a run folder's shards."""
    from ..cluster.shards import shard_files

    return shard_files(records) if records.is_dir() else [records]


def _refuse_own_input(dest: Path, records: Path, option: str) -> None:
    if _same_file(dest, *_inputs_of(records)):
        _fail(f"{option} {dest} is the results being read ({records}); write to another file (never onto its input)")


def _read_results(records: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The latest record per image of a JSONL results file, or the merged shards of a ``--ray`` run
    folder. A record with a field of the wrong type is skipped, named by file and line (a warning)."""
    from ..cluster import is_run_dir, read_shards
    from ..cluster.shards import merge
    from ..files import regular_file
    from ..runs.batch import latest, read_journal, valid_records

    try:
        if records.is_dir():
            if not is_run_dir(records):
                raise click.UsageError(f"{records} is a folder but not a 'locate --ray' run (no shards/ in it)")
            journal = valid_records(read_shards(records))
            recs = merge(journal.records)
        else:
            journal = valid_records(read_journal(regular_file(records, "results file")))
            recs = list(latest(journal.records).values())
    except Clue2GeoError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(f"cannot read results {records}: {_reason(exc)}")
    for problem in journal.problems:
        _warn(f"warning: {problem}")
    return recs, list(journal.problems)


@main.command("export")
@click.argument("records", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--to", "dest", required=True, type=click.Path(path_type=Path), help=".geojson, .csv, .jsonl or .html (report)."
)
@click.option(
    "--bundle", "bundle_path", type=click.Path(path_type=Path), help="For .html: the bundle (its CLIP patch grid)."
)
def export_records(records: Path, dest: Path, bundle_path: Path | None) -> None:
    """Convert a JSONL results file, or a 'locate --ray' run folder (its shards merged), into GeoJSON,
    CSV, JSONL or the HTML map report (latest record per image)."""
    from ..runs.batch import write_csv, write_geojson

    suffix = dest.suffix.lower()
    if suffix not in (".jsonl", ".geojson", ".csv", ".html", ".htm"):
        raise click.UsageError(f"cannot export to {dest.suffix!r}; use .geojson, .csv, .jsonl or .html")
    _refuse_own_input(dest, records, "--to")
    recs, problems = _read_results(records)
    try:
        if suffix == ".jsonl":
            from ..cluster.shards import write_jsonl

            write_jsonl(dest, recs)
        elif suffix == ".geojson":
            write_geojson(dest, recs)
        elif suffix == ".csv":
            write_csv(dest, recs)
        else:
            from ..evidence.report.render import write_report

            bundle = Bundle.open(bundle_path, verify=False) if bundle_path is not None else None
            write_report(dest, recs, bundle, results_path=records, problems=problems)
    except Clue2GeoError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(f"cannot write {dest}: {_reason(exc)}")
    click.echo(f"{len(recs)} records -> {dest}")


@main.command("report")
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
def report_cmd(
    records: Path, dest: Path, bundle_path: Path | None, image_root: Path | None, trusted_keys: tuple[str, ...]
) -> None:
    """Write the case report: one self-contained offline HTML file (photos with the matched patches,
    cluemap, candidates and metadata position on a map, chain of custody) of a JSONL results file or a
    'locate --ray' run folder. Photos are read again and shown only if their sha256 still matches.
    Without --trusted-key, the report says a signature was not checked against a key you trust."""
    from ..evidence.report.render import write_report

    _key_files(trusted_keys, "--trusted-key")
    _refuse_own_input(dest, records, "--out")
    recs, problems = _read_results(records)
    try:
        bundle = Bundle.open(bundle_path, verify=False) if bundle_path is not None else None
    except Clue2GeoError as exc:
        _fail(exc)
    try:
        write_report(
            dest,
            recs,
            bundle,
            image_root=image_root,
            results_path=records,
            trusted_keys=trusted_keys or None,
            problems=problems,
        )
    except Clue2GeoError as exc:
        _fail(exc)
    except OSError as exc:
        _fail(f"cannot write {dest}: {_reason(exc)}")
    click.echo(f"{len(recs)} records -> {dest}")


@main.command("eval")
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
@click.option(
    "--gallery",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Reference gallery of your own geotagged photos (clue2geo gallery build) instead of the bundle's.",
)
@_engine_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-cue-tokens", default=512, show_default=True, type=click.IntRange(16))
@click.option("--max-answer-tokens", default=128, show_default=True, type=click.IntRange(16))
@click.option("--verify/--no-verify", default=True, show_default=True)
@click.option("--trusted-key", "trusted_keys", multiple=True, help=_TRUSTED_KEY_HELP)
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
    device: str,
    engine: str,
    max_in_flight: int,
    verify: bool,
    trusted_keys: tuple[str, ...],
    calibration: bool,
    calibration_bins: int,
    **options: Any,
) -> None:
    """Run the pipeline over a dataset (resumable) and write per-image CSV, metrics.json and table.md
    (with --calibration, the reliability table of the confidence too); exit 0 if every image was
    located, 3 if some failed (they count as misses in the metrics)."""
    from ..evaluation.run import run_eval, variants
    from ..geolocator import Geolocator

    _check_trusted_keys(trusted_keys, verify)
    abl = [a.strip() for a in ablate.split(",") if a.strip()]
    try:
        variants(abl)
        geo = Geolocator.load(
            bundle_path,
            device=device,
            verify=verify,
            engine=engine,  # type: ignore[arg-type]
            max_in_flight=max_in_flight,
            trusted_keys=trusted_keys or None,
            **options,
        )
    except (Clue2GeoError, ValueError) as exc:
        _fail(exc)
    from ..evaluation.metrics import read_dataset

    _warn_if_demo(geo.bundle)
    n = len(read_dataset(dataset, limit=limit, seed=seed)[0]) * (1 + len(abl))
    with geo, _progress(n) as tick:
        report = run_eval(
            geo,
            dataset,
            images,
            out,
            ablate=abl,
            limit=limit,
            seed=seed,
            on_record=tick,
            on_notice=_warn,
            calibration=calibration,
            calibration_bins=calibration_bins,
        )
    click.echo((out / "table.md").read_text())
    if calibration:
        click.echo((out / "calibration.md").read_text())
        click.echo(f"wrote {out}/calibration.json, calibration.md")
    failed = {k: len(v["failed"]) for k, v in report["variants"].items()}
    click.echo(f"wrote {out}/metrics.json, table.md, per-image-*.csv; failed images per variant: {failed}")
    if any(failed.values()):
        sys.exit(EXIT_SOME_FAILED)


@main.group()
def audit() -> None:
    """Check the chain of custody of results."""


def _journal_of(results: Path) -> Path:
    """What RESULTS' hash chain and signatures are over: a JSONL journal itself, the .records.jsonl
    beside a .csv/.geojson (the table is derived from it), or a 'locate --ray' run folder (its shards)."""
    from ..cluster import is_run_dir
    from ..files import regular_file
    from ..runs.batch import journal_path

    if results.is_dir():
        if not is_run_dir(results):
            raise click.UsageError(f"{results} is a folder (not a 'locate --ray' run); pass a JSONL journal")
        return results
    try:  # a FIFO or a device would block the read for ever
        regular_file(results, "results")
        if results.suffix.lower() in (".csv", ".geojson"):
            sidecar = journal_path(results, "csv")
            if not sidecar.is_file():
                raise click.UsageError(f"{results} has no journal beside it ({sidecar.name}); pass the JSONL journal")
            return regular_file(sidecar, "results journal")
    except Clue2GeoError as exc:
        _fail(exc)
    return results


@audit.command("verify")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--anchor", default=None, help="A record_hash noted earlier: the chain must still hold that record.")
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    help="Examiner's Ed25519 public key (as for bundles): the results must be signed by it (audit sign), unchanged "
    "since; repeatable.",
)
def audit_verify(results: Path, anchor: str | None, trusted_keys: tuple[str, ...]) -> None:
    """Check the hash chain of a JSONL results journal (for a .csv or .geojson run, its .records.jsonl;
    for a 'locate --ray' run folder, its shards in write order): exit 0 when every record is intact and
    in order, 1 naming the first bad line and why. With --trusted-key, also the examiner's signature.

    The chain shows that no record was edited, removed or reordered since it was written, not who
    wrote it: anyone can write a new valid chain and sign it with a key of their own. Only
    --trusted-key says whose signature it is; without it the output says so."""
    from ..evidence.attestation import check_journal_signatures, read_journal_signatures, signature_state
    from ..runs.chain import verify_journal

    _key_files(trusted_keys, "--trusted-key")
    journal = _journal_of(results)
    try:
        if journal.is_dir():
            from ..cluster.shards import verify_run

            res = verify_run(journal, anchor=anchor)
        else:
            res = verify_journal(journal, anchor=anchor)
    except OSError as exc:
        _fail(f"cannot read {journal}: {_reason(exc)}")
    if not res.ok:
        click.secho(res.message(), fg="red", err=True)
        sys.exit(1)
    table = results if results != journal and not journal.is_dir() else None
    try:
        if trusted_keys:
            good = check_journal_signatures(journal, trusted_keys, table=table)
            click.echo(res.message())
            for sig in good:
                click.echo(f"ok: {journal} signed by trusted {sig.describe()}, unchanged since")
            return
        sigs = read_journal_signatures(journal)
        click.echo(res.message())
        if not sigs:
            click.secho(
                f"unsigned: the chain shows no record was changed since it was written, not who wrote {journal} "
                "(anyone can write a valid chain); sign with 'clue2geo audit sign', check with --trusted-key",
                fg="yellow",
            )
        bad = False
        for sig in sigs:
            state, why = signature_state(journal, sig, table=table)
            if state == "holds":
                click.secho(
                    f"signature by {sig.describe()} is self-consistent but NOT checked against a key you trust "
                    "(it was checked with the key stored beside it, which anyone can make): pass --trusted-key",
                    fg="yellow",
                )
            elif state == "appended":  # the signed records are intact; later ones are not covered
                click.secho(f"signature NOT checked against a key you trust; it covers only part: {why}", fg="yellow")
            else:
                bad = True
                click.secho(f"signature NOT checked against a key you trust, and it does not hold: {why}", fg="red")
        if bad:
            sys.exit(1)
    except Clue2GeoError as exc:
        _fail(exc)


@audit.command("sign")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option("--key", required=True, help="Ed25519 private key (PEM or 64 hex, or its file); see 'bundle keygen'.")
@click.option("--examiner", default=None, help="Who signs (name, badge number): stored and signed with the hash.")
@click.option("--case", "case_id", default=None, help="The case reference: stored and signed with the hash.")
def audit_sign(results: Path, key: str, examiner: str | None, case_id: str | None) -> None:
    """Check the results' hash chain, then sign them as they are now (sha256, record count, head
    hash, examiner, case) into RESULTS.sig.json beside the journal (a .csv or .geojson run: its
    .records.jsonl; a 'locate --ray' run folder: its shards, into RUN/run.sig.json);
    'audit verify --trusted-key' checks it."""
    from ..evidence.attestation import sign_journal, signature_path

    _key_files((key,), "--key")
    journal = _journal_of(results)
    table = results if results != journal and not journal.is_dir() else None
    try:
        sig = sign_journal(journal, key, examiner=examiner, case=case_id, table=table)
    except Clue2GeoError as exc:
        _fail(exc)
    what = "the shards of " if journal.is_dir() else ""
    click.echo(f"signed {what}{journal} ({sig.records} records, head {sig.head}) with {sig.describe()}")
    if table is not None:
        click.echo(f"with the table {table} written from it (sha256 {sig.table_sha256})")
    click.echo(f"signature: {signature_path(journal)}")


@main.command("metadata")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
def metadata_cmd(paths: tuple[Path, ...]) -> None:
    """Print what each photo's own EXIF / XMP says (position, capture time, camera, malformed values),
    one JSON object per line, without locating it."""
    from ..errors import ImageLoadError
    from ..inputs.image import read_image_file
    from ..inputs.metadata.photo import read_metadata

    for path in paths:
        try:
            row: dict[str, Any] = {"path": str(path), **read_metadata(read_image_file(path)).to_dict()}
        except ImageLoadError as exc:
            row = {"path": str(path), "error": str(exc)}
        click.echo(json.dumps(row, ensure_ascii=False))


from . import gallery as _gallery  # noqa: E402

main.add_command(_gallery.gallery)

if __name__ == "__main__":
    main()
