"""The batch job on Ray Data, driven from here: list, read and hash on CPU tasks, geolocate on an actor pool, shard.

The pipeline, for inputs listed on the driver (a folder tree through :func:`clue2geo_sdk.inputs.discover.discover`,
the single-machine rules) or read by Ray Data (an input list: a Parquet/CSV file with a ``path`` column)::

    paths --map_batches(read_and_hash, CPU tasks)--> bytes, sha256, skip?
          --map_batches(GeolocatorActor, actor pool: one Geolocator per actor)--> records (JSON)
          --driver--> DIR/shards/*.jsonl (+ Parquet twins) --merge--> DIR/results.jsonl

Each actor (:mod:`.actor`) builds one :class:`~clue2geo_sdk.Geolocator` in ``__init__`` (bundle checked once
per node, :mod:`.nodecheck`) and runs each batch through ``geo.map_in_flight``, so ``in_flight`` images share
the engine's batches. Records are made by :func:`clue2geo_sdk.runs.records.record_of` with the same identity,
so they are the single-machine CLI's records. Only the driver writes, so the output folder need not
be shared; the inputs, the bundle and a photo gallery (``gallery=``) must be readable at the same
paths on every node. The driver reads only the gallery's manifest; each actor opens the gallery, whose
manifest must be the driver's byte for byte and whose rows must have the digest it promises.

Exactly once: resuming sends the images whose latest record has this run's identity (an
:class:`~clue2geo_sdk.cluster.actor.DoneSet`: path, absolute path and sha256) to the read tasks, which
skip them after hashing; a task retried after its actor died may return a record twice, and the driver
writes one record per (path, image_sha256, bundle_digest, options_digest) key; the merge takes one
record per image. A bad image is an error record, as on one machine. One driver per output folder:
it holds the folder's lock for the whole run, and a second one is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import ray
import ray.data

from ..bundle.manifest import Bundle
from ..errors import BundleFormatError, Clue2GeoError
from ..files import sha256_file
from ..inputs.discover import discover
from ..options import Options
from ..results import Failure
from ..retrieval.photos import GALLERY_MANIFEST_FILE, check_image_tower, read_manifest
from ..runs.batch import BatchSummary
from ..runs.formats import write_csv, write_geojson
from ..runs.journal import ResultsExistError, ResultsWriteError
from ..runs.records import Record, absolute, identity_of, record_of, utc_now
from ..runs.resume import ImageIndex, resume_index, resume_state
from . import shards
from .actor import DoneSet, GeolocatorActor, decode_path, read_and_hash
from .plan import ActorPlan, ClusterJobError, alive_nodes, connect, plan_actors, quiet_ray

INPUT_LIST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_TASK_RETRIES = 3  # a batch whose actor dies more often than this fails the job (a poison input)


@attrs.define
class ClusterSummary(BatchSummary):
    """:class:`BatchSummary` of a cluster run, with what the cluster did."""

    duplicates: int = 0  # records a retried task made twice, written once
    merged: Path | None = None
    shards: list[str] = attrs.field(factory=list)
    plan: dict[str, Any] = attrs.field(factory=dict)
    seconds: float = 0.0


@attrs.frozen(kw_only=True)
class RayRun:
    """The settings of one cluster run, as :func:`locate_on_ray` was given them."""

    address: str | None
    recursive: bool
    resume: bool
    retry_failed: bool
    fmt: str
    actors: int | None
    cpus_per_actor: float | None
    in_flight: int
    batch_size: int | None
    records_per_shard: int
    device: str
    engine: str
    n_threads: int | None
    verify: bool
    verbose: bool
    options: dict[str, Any]
    on_total: Callable[[int], None] | None
    on_record: Callable[[dict[str, Any]], None] | None

    @property
    def batch(self) -> int:
        """Images per read task and per actor call (default ``2 * in_flight``)."""
        return self.batch_size or 2 * self.in_flight


@attrs.frozen(kw_only=True)
class _Driver:
    """What the driver holds for one run: the folder, the bundle, the identity every record carries,
    the photo gallery and its manifest's sha256, the summary, and where notices go."""

    out: Path
    bundle: Bundle
    ident: dict[str, Any]
    gallery: Path | None
    gallery_manifest: str | None
    on_notice: Callable[[str], None] | None
    summary: ClusterSummary = attrs.field(factory=ClusterSummary)

    def notice(self, msg: str) -> None:
        self.summary.notices.append(msg)
        if self.on_notice:
            self.on_notice(msg)
        else:
            warnings.warn(msg, stacklevel=3)


class _Emitter:
    """Writes the records that come back to the shards, once each (a task retried after its actor
    died may return one twice), and counts them as the single-machine runner does."""

    def __init__(self, driver: _Driver, writer: shards.ShardWriter, index: ImageIndex, run: RayRun) -> None:
        self.driver, self.writer, self.index, self.on_record = driver, writer, index, run.on_record
        self.seen: set[tuple[Any, ...]] = set()

    def emit(self, recs: Iterable[dict[str, Any]]) -> None:
        summary = self.driver.summary
        fresh = []
        for rec in recs:
            key = shards.record_key(Record.from_dict(rec, strict=False))
            if key in self.seen:
                summary.duplicates += 1
                continue
            self.seen.add(key)
            fresh.append(rec)
        for line in self.writer.write(fresh):
            rec = Record.from_dict(line, strict=False)  # lenient: a NaN position was written as null
            path, sha = str(rec.path), rec.image_sha256 or None
            state = resume_state(self.index, path, rec.abs_path or absolute(path), sha, self.driver.ident)
            if state.notice:
                self.driver.notice(state.notice)
            summary.rerun += state.rerun
            self.index.add(rec)
            if rec.ok:
                summary.ok += 1
            else:
                summary.error += 1
            if self.on_record:
                self.on_record(line)

    def skipped(self, path: str) -> None:
        self.driver.summary.skipped += 1
        if self.on_record:
            self.on_record({"path": path, "status": "skipped"})


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?\w*(?:Error|Exception)\b:? ?.*$")


def _cause(exc: BaseException) -> str:
    """The line that says why a Ray job failed: the worker's own exception (e.g. ``BundleIntegrityError:
    ... is corrupt ...``) rather than Ray's wrapping of it."""
    inner: BaseException = exc
    while getattr(inner, "cause", None) is not None:
        inner = inner.cause  # type: ignore[assignment]
    lines = [ln.strip() for ln in (str(inner) or repr(inner)).splitlines() if ln.strip()]
    found = [ln for ln in lines if _ERROR_LINE.match(ln) and ":" in ln]
    text = found[-1] if found else (lines[-1] if lines else type(exc).__name__)
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _gallery_digest(gallery: Path, bundle: Bundle) -> tuple[str, str]:
    """The photo gallery's content digest as its manifest states it, and the manifest's sha256, after
    the checks the driver can make without the rows. Each actor's :class:`PhotoGallery` recomputes
    the content digest from the rows it opens, and its manifest must be the driver's byte for byte."""
    manifest = read_manifest(gallery)
    check_image_tower(gallery, manifest, bundle.component("gpsclip").files["image"].sha256)
    if not isinstance(manifest.get("content_sha256"), str):
        raise BundleFormatError(
            f"{gallery / GALLERY_MANIFEST_FILE}: no content_sha256; rebuild with `clue2geo gallery build`"
        )
    return manifest["content_sha256"], sha256_file(gallery / GALLERY_MANIFEST_FILE)


def _driver(
    out: Path, bundle: str | Path, gallery: str | Path | None, opts: Options, on_notice: Callable[[str], None] | None
) -> _Driver:
    """The driver's side of a run, checked before anything is written: the bundle's manifest (the
    actors verify its files on their node), the photo gallery's digests, and a folder ``out``."""
    b = Bundle.open(bundle, verify=False)
    where = None if gallery is None else Path(gallery).absolute()  # symlinks are each node's own
    gallery_digest, gallery_manifest = (None, None) if where is None else _gallery_digest(where, b)
    ident = identity_of(b, opts, gallery_digest=gallery_digest)
    if out.exists() and not out.is_dir():
        raise ResultsExistError(f"{out} is a file; a cluster run writes a folder (shards and results.jsonl)")
    if out.is_dir() and not shards.shard_dir(out).is_dir() and any(out.iterdir()):
        raise ResultsExistError(f"{out} is not empty and is not a clue2geo cluster run (no shards/); choose another")
    return _Driver(
        out=out, bundle=b, ident=ident, gallery=where, gallery_manifest=gallery_manifest, on_notice=on_notice
    )


def _resume_index(driver: _Driver, run: RayRun) -> tuple[ImageIndex, DoneSet]:
    """Refuse a folder that holds results unless resuming. Resuming: the images its shards hold (a torn
    line cut off, the open shard sealed), and the done set the read tasks need (each image's sha256
    and whether it is done under this run's identity)."""
    out = driver.out
    if shards.shard_files(out) and not run.resume:
        raise ResultsExistError(f"{out} already holds results; pass resume=True (--resume) or choose another folder")
    index = ImageIndex()
    if run.resume:
        try:
            read = shards.read_shards(out, repair=True)
            shards.seal_all(out)  # the open shard of a stopped driver
        except OSError as exc:
            raise ResultsWriteError(shards.shard_dir(out), exc) from None
        index = resume_index(read, out, driver.ident, driver.notice)
    return index, DoneSet.of(index, driver.ident, retry_failed=run.retry_failed)


def _input_list_of(sources: Sequence[str | Path]) -> Path | None:
    """The input list (a ``.csv`` / ``.parquet`` file of paths) when it is the one source given."""
    if len(sources) == 1:
        p = Path(sources[0])
        if p.is_file() and p.suffix.lower() in INPUT_LIST_SUFFIXES:
            return p
    return None


def _input_list_dataset(input_list: Path, run: RayRun) -> tuple[ray.data.Dataset, str, int]:
    """The paths of an input list, read by Ray Data; the folder its relative paths are read from; how many."""
    kind = INPUT_LIST_SUFFIXES[input_list.suffix.lower()]
    ds = ray.data.read_csv(str(input_list)) if kind == "csv" else ray.data.read_parquet(str(input_list))
    if "path" not in ds.columns():
        raise ClusterJobError(f"{input_list}: a manifest needs a 'path' column; it has {', '.join(ds.columns())}")
    ds = ds.select_columns(["path"])
    total = ds.count()
    if run.on_total:
        run.on_total(total)
    return ds, str(input_list.resolve().parent), total


def _listed_dataset(
    listed: list[Path | Failure], done: DoneSet, emitter: _Emitter, run: RayRun
) -> tuple[ray.data.Dataset, str, int]:
    """The paths listed on the driver as a dataset, read from this working folder, and how many. What
    the listing could not list (symlink loops, unreadable folders) is recorded here, as on one machine."""
    paths = [str(p) for p in listed if not isinstance(p, Failure)]
    if run.on_total:
        run.on_total(len(listed))
    for f in (f for f in listed if isinstance(f, Failure)):
        held = done.done_record(f.image, absolute(f.image), None)
        if held is not None and not held.image_sha256:
            emitter.skipped(f.image)
        else:
            now = utc_now()
            emitter.emit([record_of(f, f.image, 0.0, emitter.driver.ident, started_utc=now, finished_utc=now)])
    blocks = max(1, min(math.ceil(len(paths) / run.batch), 10_000))
    ds = ray.data.from_items([{"path": os.fsencode(p)} for p in paths], override_num_blocks=blocks)
    return ds, os.getcwd(), len(listed)


def _actor_args(driver: _Driver, run: RayRun, plan: ActorPlan) -> dict[str, Any]:
    """What each :class:`GeolocatorActor` is built with: the bundle, the identity its own must equal,
    how it loads the Geolocator, and the gallery manifest's sha256 its copy must have."""
    load = {"device": plan.device, "engine": run.engine, "n_threads": plan.n_threads, "verbose": run.verbose}
    load |= run.options
    if driver.gallery is not None:
        load["gallery"] = str(driver.gallery)
    ctor = {"bundle": str(driver.bundle.root), "ident": driver.ident, "load": load, "in_flight": run.in_flight}
    return ctor | {"verify": run.verify, "gallery_manifest": driver.gallery_manifest}


def _actor_stage(ds: ray.data.Dataset, plan: ActorPlan, batch_size: int, ctor: dict[str, Any]) -> ray.data.Dataset:
    kwargs: dict[str, Any] = {
        "batch_size": batch_size,
        "compute": ray.data.ActorPoolStrategy(size=plan.actors),
        "num_cpus": plan.num_cpus,
        "fn_constructor_kwargs": ctor,
    }
    if plan.num_gpus:
        kwargs["num_gpus"] = plan.num_gpus
    try:  # bounded retries: a worker death is retried, an input that kills every actor is not for ever
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.map_batches(GeolocatorActor, **kwargs, max_task_retries=MAX_TASK_RETRIES)
    except TypeError:  # a Ray without free-form remote args: its default (retry while actors restart)
        return ds.map_batches(GeolocatorActor, **kwargs)


def _pipeline(
    driver: _Driver, run: RayRun, inputs: Path | list[Path | Failure], done: DoneSet, emitter: _Emitter
) -> tuple[ray.data.Dataset, int]:
    """The job on the connected cluster: the inputs (an input list, or what the driver listed), read
    and hashed on CPU tasks, geolocated by the actor pool; and how many inputs there are."""
    plan = plan_actors(
        alive_nodes(), actors=run.actors, device=run.device, cpus_per_actor=run.cpus_per_actor, n_threads=run.n_threads
    )
    driver.summary.plan = plan.to_dict()
    if isinstance(inputs, Path):
        ds, base, total = _input_list_dataset(inputs, run)
    else:
        ds, base, total = _listed_dataset(inputs, done, emitter, run)
    fn_kwargs = {"done_ref": [ray.put(done)], "base": base}
    ds = ds.map_batches(read_and_hash, batch_size=run.batch, num_cpus=0.25, fn_kwargs=fn_kwargs)
    return _actor_stage(ds, plan, run.batch, _actor_args(driver, run, plan)), total


def _collect(ds: ray.data.Dataset, emitter: _Emitter) -> None:
    """Write the records of each batch the actors return (skipped inputs are counted, not written)."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        recs = []
        for path, status, line in zip(batch["path"], batch["status"], batch["record"], strict=True):
            if status == "skipped":
                emitter.skipped(decode_path(path))
            else:
                recs.append(json.loads(line))
        emitter.emit(recs)


def _merge(driver: _Driver, fmt: str) -> None:
    """Merge the shards into ``out/results.jsonl`` (one record per input), and ``results.csv`` or
    ``results.geojson`` for ``fmt``."""
    out = driver.out
    try:
        dest, merged = shards.write_merged(out)
        driver.summary.merged = dest
        if fmt == "csv":
            write_csv(out / "results.csv", merged.records)
        elif fmt == "geojson":
            write_geojson(out / "results.geojson", merged.records)
    except OSError as exc:
        raise ResultsWriteError(out, exc) from None


def _run(sources: list[Path], driver: _Driver, run: RayRun) -> None:
    """:func:`locate_on_ray` once the run folder is locked: resume, run the job, merge the shards."""
    index, done = _resume_index(driver, run)
    inputs = _input_list_of(sources) or list(discover(sources, recursive=run.recursive))
    writer = shards.ShardWriter(driver.out, records_per_shard=run.records_per_shard)
    emitter = _Emitter(driver, writer, index, run)
    started = finished = False
    try:
        started = connect(run.address, run.verbose)
        quiet_ray(run.verbose)
        ds, total = _pipeline(driver, run, inputs, done, emitter)
        if total:
            _collect(ds, emitter)
        finished = True
    except (Clue2GeoError, FileExistsError, KeyboardInterrupt):
        raise
    except Exception as exc:  # Ray's wrapping of a worker's error: say why in one line
        raise ClusterJobError(
            f"the cluster job stopped: {_cause(exc)}; the records written so far are kept in {driver.out}, "
            "run again with --resume (resume=True) to continue"
        ) from exc
    finally:
        writer.close(quiet=not finished)  # a failed run reports its first error, not the seal's
        driver.summary.shards = [p.name for p in writer.written]
        if started:
            ray.shutdown()
    _merge(driver, run.fmt)


def locate_on_ray(
    sources: Sequence[str | Path],
    bundle: str | Path,
    out: str | Path,
    *,
    address: str | None = None,
    recursive: bool = False,
    resume: bool = False,
    retry_failed: bool = False,
    fmt: str = "jsonl",
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    in_flight: int = 4,
    batch_size: int | None = None,
    records_per_shard: int = 1000,
    device: str = "auto",
    engine: str = "batched",
    gallery: str | Path | None = None,
    n_threads: int | None = None,
    verify: bool = True,
    verbose: bool = False,
    on_total: Callable[[int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_notice: Callable[[str], None] | None = None,
    **options: Any,
) -> ClusterSummary:
    """Geolocate ``sources`` (folders and files, or one ``.csv``/``.parquet`` input list with a ``path``
    column; relative paths in it are read from its folder) on the Ray cluster at
    ``address`` (None: Ray's default, ``RAY_ADDRESS`` or the cluster ``ray start`` made, else a new
    local one, shut down at the end) into the folder ``out``: ``out/shards/`` and the merged
    ``out/results.jsonl`` (plus ``results.csv`` / ``results.geojson`` for ``fmt``).

    ``resume`` skips inputs whose latest record has the same path, image sha256, bundle, options and
    SDK version; ``retry_failed`` also runs again those whose latest record is an error. ``actors``
    (default: one per GPU, else one per node), ``in_flight`` images per actor, ``batch_size`` images
    per actor call (default ``2 * in_flight``). ``gallery`` (a ``clue2geo gallery build`` folder, at
    the same path on every node) replaces the bundle's coordinate gallery, as in
    :meth:`Geolocator.load`. ``options`` are :class:`~clue2geo_sdk.Options` fields.
    Raises :class:`ClusterJobError` when the job cannot finish; records written so far stay, and
    ``resume=True`` continues."""
    t_start = time.perf_counter()
    sources = [Path(s) for s in sources]
    run = RayRun(
        address=address, recursive=recursive, resume=resume, retry_failed=retry_failed, fmt=fmt, actors=actors,
        cpus_per_actor=cpus_per_actor, in_flight=in_flight, batch_size=batch_size,
        records_per_shard=records_per_shard, device=device, engine=engine, n_threads=n_threads, verify=verify,
        verbose=verbose, options=options, on_total=on_total, on_record=on_record,
    )  # fmt: skip
    driver = _driver(Path(out), bundle, gallery, Options.from_kwargs(**options), on_notice)
    lock = shards.lock_run(driver.out)  # held to the end of the run: a second driver on this folder stops here
    try:
        _run(sources, driver, run)
        driver.summary.seconds = time.perf_counter() - t_start
    finally:
        os.close(lock)
    return driver.summary
