"""The batch job on Ray Data: list, read and hash on CPU tasks, geolocate on an actor pool, shard.

The pipeline, for inputs listed on the driver (a folder tree through :func:`clue2geo_sdk.inputs.discover.discover`,
the single-machine rules) or read by Ray Data (a Parquet/CSV manifest with a ``path`` column)::

    paths --map_batches(read_and_hash, CPU tasks)--> bytes, sha256, skip?
          --map_batches(GeolocatorActor, actor pool: one Geolocator per actor)--> records (JSON)
          --driver--> DIR/shards/*.jsonl (+ Parquet twins) --merge--> DIR/results.jsonl

Each actor builds one :class:`~clue2geo_sdk.Geolocator` in ``__init__`` (bundle checked once per node,
:mod:`.nodecheck`) and runs each batch through ``geo.map_in_flight``, so ``in_flight`` images share the
engine's batches. Records are made by :func:`clue2geo_sdk.runs.batch.record_of` with the same identity,
so they are the single-machine CLI's records. Only the driver writes, so the output folder need not
be shared; the inputs, the bundle and a photo gallery (``gallery=``) must be readable at the same
paths on every node. The driver reads only the gallery's manifest; each actor opens the gallery, whose
manifest must be the driver's byte for byte and whose rows must have the digest it promises.

Exactly once: resuming sends the images whose latest record has this run's identity (an
:class:`~clue2geo_sdk.runs.batch.ImageIndex` of path, absolute path and sha256) to the read tasks, which
skip them after hashing; a task retried after its actor died may return a record twice, and the driver
writes one record per (path, image_sha256, bundle_digest, options_digest) key; the merge takes one
record per image. A bad image is an error record, as on one machine. One driver per output folder:
it holds the folder's lock for the whole run, and a second one is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import ray
import ray.data

from ..bundle.manifest import Bundle
from ..errors import BundleFormatError, BundleIntegrityError, Clue2GeoError
from ..inputs.discover import discover, read_input_bytes, sha256_of
from ..options import Options
from ..results import Failure
from ..retrieval.photos import MANIFEST as GALLERY_MANIFEST
from ..retrieval.photos import check_image_tower, read_manifest
from ..runs.batch import (
    IDENTITY_FIELDS,
    BatchSummary,
    ImageIndex,
    ResultsExistError,
    ResultsWriteError,
    absolute,
    identity,
    identity_of,
    record_of,
    resume_index,
    resume_state,
    utc_now,
    write_csv,
    write_geojson,
)
from . import shards
from .nodecheck import verify_once

MANIFEST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MAX_TASK_RETRIES = 3  # a batch whose actor dies more often than this fails the job (a poison input)
ACTOR_WAIT_S = 600  # fail, rather than wait for ever, when the cluster cannot place the actors


class ClusterJobError(Clue2GeoError, RuntimeError):
    """The cluster job could not run or finish (actors could not start, a batch kept killing its actor)."""


@attrs.frozen(kw_only=True)
class ActorPlan:
    """How many actors, what each asks of Ray, and how it runs: GPU actors (one GPU each) when the
    cluster has GPUs, else CPU actors with a fractional CPU request (reads keep a CPU, DESIGN §9)."""

    actors: int
    num_gpus: float
    num_cpus: float
    device: str
    n_threads: int | None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def plan_actors(
    nodes: Sequence[dict[str, float]],
    *,
    actors: int | None = None,
    device: str = "auto",
    cpus_per_actor: float | None = None,
    n_threads: int | None = None,
) -> ActorPlan:
    """An :class:`ActorPlan` from the alive nodes' resources (``{"CPU": .., "GPU": ..}`` each).

    GPU: one actor per GPU (``num_gpus=1``, ``device="cuda"``). CPU: one actor per node unless
    ``actors`` says otherwise; each asks for at most one CPU and at most half its node's share, so
    the read tasks always find a CPU, and runs llama.cpp on its share of the node's threads (half
    the logical CPUs, the engines' default on one machine)."""
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if device != "cpu" and gpus >= 1:
        return ActorPlan(
            actors=actors or int(gpus), num_gpus=1.0, num_cpus=cpus_per_actor or 1.0, device="cuda", n_threads=n_threads
        )
    if device == "cuda":
        raise ClusterJobError("device cuda was asked for, but the Ray cluster has no GPU")
    cpu_nodes = [n for n in nodes if n.get("CPU", 0.0) > 0] or [{"CPU": 1.0}]
    count = actors or len(cpu_nodes)
    per_node = math.ceil(count / len(cpu_nodes))
    node_cpus = min(n["CPU"] for n in cpu_nodes)
    request = cpus_per_actor or min(1.0, node_cpus / (2 * per_node))
    threads = n_threads or max(1, int(node_cpus // 2 // per_node))  # the engines' rule, shared by the node's actors
    return ActorPlan(actors=count, num_gpus=0.0, num_cpus=request, device="cpu", n_threads=threads)


@attrs.define
class ClusterSummary(BatchSummary):
    """:class:`BatchSummary` of a cluster run, with what the cluster did."""

    duplicates: int = 0  # records a retried task made twice, written once
    merged: Path | None = None
    shards: list[str] = attrs.field(factory=list)
    plan: dict[str, Any] = attrs.field(factory=dict)
    seconds: float = 0.0


# -- the tasks and the actor (run on the workers) ------------------------------------------------

_DONE_CACHE: dict[str, ImageIndex] = {}


def _path(value: Any) -> str:
    """Paths travel as bytes (``os.fsencode``: any file name survives Arrow); manifests give strings."""
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


def _done(done_ref: list[Any]) -> ImageIndex:
    """The resume set, fetched once per worker process."""
    ref = done_ref[0]
    key = ref.hex()
    if key not in _DONE_CACHE:
        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    return _DONE_CACHE[key]


def read_and_hash(batch: dict[str, np.ndarray], *, done_ref: list[Any], base: str) -> dict[str, np.ndarray]:
    """Read each input's bytes and sha256 (as the single-machine runner does); inputs already done
    under this run's identity (``done``: records reduced to their sha256 and a ``done`` flag) are
    marked ``skip`` and carry no bytes."""
    done = _done(done_ref)
    paths = [_path(p) for p in batch["path"]]
    files, shas, readable, skip, data = [], [], [], [], []
    for path in paths:
        file = os.path.abspath(path if os.path.isabs(path) else os.path.join(base, path))
        raw = read_input_bytes(Path(file))
        sha = sha256_of(raw)
        g = done.find(path, file, sha)
        skipped = g is not None and done.records[g]["done"] and done.records[g]["image_sha256"] == sha
        files.append(file)
        shas.append(sha or "")
        readable.append(raw is not None)
        skip.append(skipped)
        data.append(b"" if skipped or raw is None else raw)
    obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731
    return {
        "path": obj([os.fsencode(p) for p in paths]),
        "file": obj(files),
        "sha256": obj(shas),
        "readable": np.array(readable, dtype=bool),
        "skip": np.array(skip, dtype=bool),
        "data": obj(data),
    }


class GeolocatorActor:
    """One :class:`~clue2geo_sdk.Geolocator` per actor, built once; each batch runs ``in_flight`` at a time."""

    def __init__(
        self,
        bundle: str,
        ident: dict[str, Any],
        load: dict[str, Any],
        in_flight: int,
        verify: bool,
        gallery_manifest: str | None = None,
    ) -> None:
        from ..geolocator import Geolocator

        ctx = ray.get_runtime_context()
        if verify:
            verify_once(bundle, ident["bundle_digest"], node=ctx.get_node_id(), job=ctx.get_job_id())
        self.geo = Geolocator.load(bundle, verify=False, max_in_flight=in_flight, **load)
        if gallery_manifest is not None:  # same rows (the identity) is not enough: same index settings too
            mine = _manifest_sha256(Path(load["gallery"]))
            if mine != gallery_manifest:
                self.geo.close()
                raise BundleIntegrityError(
                    f"node {ctx.get_node_id()}: the photo gallery at {load['gallery']} has manifest sha256 {mine}, "
                    f"the driver's has {gallery_manifest}; every node needs the same gallery (shared storage or "
                    "an identical copy)"
                )
        self.ident = identity(self.geo)
        if self.ident != ident:
            differ = {k: (ident[k], self.ident[k]) for k in IDENTITY_FIELDS if ident[k] != self.ident[k]}
            raise BundleIntegrityError(
                f"node {ctx.get_node_id()}: this actor's bundle, gallery or options differ from the driver's: {differ}"
            )
        self.in_flight = in_flight

    def _one(self, row: tuple[str, str, str, bool, bytes]) -> dict[str, Any]:
        path, file, sha, readable, data = row
        t0, started = time.perf_counter(), utc_now()
        result = self.geo.try_locate(data if readable else Path(file), name=path, options=self.geo.options)
        if isinstance(result, Failure):
            result = attrs.evolve(result, image_sha256=sha or None)
        seconds, finished = time.perf_counter() - t0, utc_now()
        return record_of(result, path, seconds, self.ident, started_utc=started, finished_utc=finished, abs_path=file)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["path"])
        todo = [
            (_path(batch["path"][i]), str(batch["file"][i]), str(batch["sha256"][i]), bool(batch["readable"][i]),
             bytes(batch["data"][i]))
            for i in range(n)
            if not batch["skip"][i]
        ]  # fmt: skip
        done = iter(self.geo.map_in_flight(self._one, todo, in_flight=self.in_flight))
        paths, status, records = [], [], []
        for i in range(n):
            paths.append(batch["path"][i])
            if batch["skip"][i]:
                status.append("skipped")
                records.append("")
            else:
                rec = next(done)
                status.append(rec["status"])
                records.append(json.dumps(rec))  # ASCII: lone surrogates of odd file names survive Arrow
        obj = lambda xs: np.array(xs, dtype=object)  # noqa: E731
        return {"path": obj(paths), "status": obj(status), "record": obj(records)}


# -- the driver -----------------------------------------------------------------------------------


def _manifest_of(sources: Sequence[str | Path]) -> Path | None:
    if len(sources) == 1:
        p = Path(sources[0])
        if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            return p
    return None


def _read_manifest(manifest: Path) -> ray.data.Dataset:
    kind = MANIFEST_SUFFIXES[manifest.suffix.lower()]
    ds = ray.data.read_csv(str(manifest)) if kind == "csv" else ray.data.read_parquet(str(manifest))
    if "path" not in ds.columns():
        raise ClusterJobError(f"{manifest}: a manifest needs a 'path' column; it has {', '.join(ds.columns())}")
    return ds.select_columns(["path"])


def _connect(address: str | None, verbose: bool) -> bool:
    """Connect to (or start) a cluster; True when this call did, so the run shuts it down after."""
    if ray.is_initialized():
        return False
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
    return True


def _quiet(ctx: Any, verbose: bool) -> None:
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = False
    ctx.wait_for_min_actors_s = ACTOR_WAIT_S
    if not verbose:  # a failed job is reported in one line (ClusterJobError); --verbose shows Ray's traces
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # Ray's one line saying its bars are off: we draw ours


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


def _manifest_sha256(gallery: Path) -> str:
    return hashlib.sha256((gallery / GALLERY_MANIFEST).read_bytes()).hexdigest()


def _gallery_digest(gallery: Path, bundle: Bundle) -> tuple[str, str]:
    """The photo gallery's content digest as its manifest states it, and the manifest's sha256, after
    the checks the driver can make without the rows. Each actor's :class:`PhotoGallery` recomputes
    the content digest from the rows it opens, and its manifest must be the driver's byte for byte."""
    manifest = read_manifest(gallery)
    check_image_tower(gallery, manifest, bundle.component("gpsclip").files["image"].sha256)
    if not isinstance(manifest.get("content_sha256"), str):
        raise BundleFormatError(
            f"{gallery / GALLERY_MANIFEST}: no content_sha256; rebuild with `clue2geo gallery build`"
        )
    return manifest["content_sha256"], _manifest_sha256(gallery)


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
    """Geolocate ``sources`` (folders and files, or one ``.csv``/``.parquet`` manifest with a ``path``
    column; relative manifest paths are read from the manifest's folder) on the Ray cluster at
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
    out = Path(out)
    sources = [Path(s) for s in sources]
    opts = Options.from_kwargs(**options)
    b = Bundle.open(bundle, verify=False)  # the manifest only: actors verify the files on their node
    gallery = None if gallery is None else Path(gallery).absolute()  # symlinks are each node's own
    gallery_digest, gallery_manifest = (None, None) if gallery is None else _gallery_digest(gallery, b)
    ident = identity_of(b, opts, gallery_digest=gallery_digest)
    summary = ClusterSummary()

    def notice(msg: str) -> None:
        summary.notices.append(msg)
        if on_notice:
            on_notice(msg)
        else:
            warnings.warn(msg, stacklevel=3)

    if out.exists() and not out.is_dir():
        raise ResultsExistError(f"{out} is a file; a cluster run writes a folder (shards and results.jsonl)")
    if out.is_dir() and not shards.shard_dir(out).is_dir() and any(out.iterdir()):
        raise ResultsExistError(f"{out} is not empty and is not a clue2geo cluster run (no shards/); choose another")
    lock = shards.lock_run(out)  # held to the end of the run: a second driver on this folder stops here
    try:
        return _run(
            sources, b, out, summary, notice, ident, gallery, gallery_manifest, t_start,
            address=address, recursive=recursive, resume=resume, retry_failed=retry_failed, fmt=fmt, actors=actors,
            cpus_per_actor=cpus_per_actor, in_flight=in_flight, batch_size=batch_size,
            records_per_shard=records_per_shard, device=device, engine=engine, n_threads=n_threads, verify=verify,
            verbose=verbose, on_total=on_total, on_record=on_record, options=options,
        )  # fmt: skip
    finally:
        os.close(lock)


def _run(
    sources: list[Path],
    b: Bundle,
    out: Path,
    summary: ClusterSummary,
    notice: Callable[[str], None],
    ident: dict[str, Any],
    gallery: Path | None,
    gallery_manifest: str | None,
    t_start: float,
    *,
    address: str | None,
    recursive: bool,
    resume: bool,
    retry_failed: bool,
    fmt: str,
    actors: int | None,
    cpus_per_actor: float | None,
    in_flight: int,
    batch_size: int | None,
    records_per_shard: int,
    device: str,
    engine: str,
    n_threads: int | None,
    verify: bool,
    verbose: bool,
    on_total: Callable[[int], None] | None,
    on_record: Callable[[dict[str, Any]], None] | None,
    options: dict[str, Any],
) -> ClusterSummary:
    """:func:`locate_on_ray` once the run folder is locked."""
    has_shards = bool(shards.shard_files(out))
    if has_shards and not resume:
        raise ResultsExistError(f"{out} already holds results; pass resume=True (--resume) or choose another folder")

    index = ImageIndex()
    if resume:
        try:
            read = shards.read_shards(out, repair=True)
            shards.seal_all(out)  # the open shard of a stopped driver
        except OSError as exc:
            raise ResultsWriteError(shards.shard_dir(out), exc) from None
        index = resume_index(read, out, ident, notice)
    done = ImageIndex()  # what the read tasks need: each image's sha256 and whether it is done
    for rec in index.records.values():
        ok = all(rec.get(k) == ident[k] for k in IDENTITY_FIELDS)
        ok = ok and not (retry_failed and rec.get("status") == "error")
        done.add({k: rec.get(k) for k in ("path", "abs_path", "image_sha256")} | {"done": ok})

    manifest = _manifest_of(sources)
    listed: list[Path | Failure] = [] if manifest else list(discover(sources, recursive=recursive))
    writer = shards.ShardWriter(out, records_per_shard=records_per_shard)
    started = False
    seen: set[tuple[Any, ...]] = set()
    finished = False

    def emit(recs: Iterable[dict[str, Any]]) -> None:
        fresh = []
        for rec in recs:
            key = shards.record_key(rec)
            if key in seen:
                summary.duplicates += 1
                continue
            seen.add(key)
            fresh.append(rec)
        for rec in writer.write(fresh):
            path, sha = str(rec.get("path")), rec.get("image_sha256") or None
            state = resume_state(index, path, rec.get("abs_path") or absolute(path), sha, ident)
            if state.notice:
                notice(state.notice)
            summary.rerun += state.rerun
            index.add(rec)
            if rec["status"] == "ok":
                summary.ok += 1
            else:
                summary.error += 1
            if on_record:
                on_record(rec)

    def skipped(path: str) -> None:
        summary.skipped += 1
        if on_record:
            on_record({"path": path, "status": "skipped"})

    try:
        started = _connect(address, verbose)
        ctx = ray.data.DataContext.get_current()
        _quiet(ctx, verbose)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = plan_actors(nodes, actors=actors, device=device, cpus_per_actor=cpus_per_actor, n_threads=n_threads)
        summary.plan = plan.to_dict()
        size = batch_size or 2 * in_flight
        if manifest:
            ds = _read_manifest(manifest)
            base = str(manifest.resolve().parent)
            total = ds.count()
        else:
            failures = [f for f in listed if isinstance(f, Failure)]
            paths = [str(p) for p in listed if not isinstance(p, Failure)]
            base = os.getcwd()
            total = len(listed)
            if on_total:
                on_total(total)
            for f in failures:  # symlink loops, unreadable folders: recorded here, as on one machine
                g = done.find(f.image, absolute(f.image), None)
                if g is not None and done.records[g]["done"] and not done.records[g]["image_sha256"]:
                    skipped(f.image)
                else:
                    now = utc_now()
                    emit([record_of(f, f.image, 0.0, ident, started_utc=now, finished_utc=now)])
            blocks = max(1, min(math.ceil(len(paths) / size), 10_000))
            ds = ray.data.from_items([{"path": os.fsencode(p)} for p in paths], override_num_blocks=blocks)
        if manifest and on_total:
            on_total(total)
        ds = ds.map_batches(
            read_and_hash, batch_size=size, num_cpus=0.25, fn_kwargs={"done_ref": [ray.put(done)], "base": base}
        )
        load = {"device": plan.device, "engine": engine, "n_threads": plan.n_threads, "verbose": verbose, **options}
        if gallery is not None:
            load["gallery"] = str(gallery)
        ctor = {"bundle": str(b.root), "ident": ident, "load": load, "in_flight": in_flight, "verify": verify}
        ctor |= {"gallery_manifest": gallery_manifest}
        ds = _actor_stage(ds, plan, size, ctor)
        if total:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                recs = []
                for path, status, line in zip(batch["path"], batch["status"], batch["record"], strict=True):
                    if status == "skipped":
                        skipped(_path(path))
                    else:
                        recs.append(json.loads(line))
                emit(recs)
        finished = True
    except (Clue2GeoError, FileExistsError, KeyboardInterrupt):
        raise
    except Exception as exc:  # Ray's wrapping of a worker's error: say why in one line
        raise ClusterJobError(
            f"the cluster job stopped: {_cause(exc)}; the records written so far are kept in {out}, "
            "run again with --resume (resume=True) to continue"
        ) from exc
    finally:
        writer.close(quiet=not finished)  # a failed run reports its first error, not the seal's
        summary.shards = [p.name for p in writer.written]
        if started:
            ray.shutdown()
    try:
        dest, merged = shards.write_merged(out)
        summary.merged = dest
        if fmt == "csv":
            write_csv(out / "results.csv", merged.records)
        elif fmt == "geojson":
            write_geojson(out / "results.geojson", merged.records)
    except OSError as exc:
        raise ResultsWriteError(out, exc) from None
    summary.seconds = time.perf_counter() - t_start
    return summary
