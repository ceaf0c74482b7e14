"""What runs on the workers: the read tasks (bytes and sha256 of each input) and the Geolocator actors.

Imported only when a cluster run starts (it imports Ray; see :mod:`clue2geo_sdk.cluster`). Records are
made by :func:`clue2geo_sdk.runs.records.record_of` with the driver's identity, so they are the
single-machine runner's records.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import ray

from ..errors import BundleIntegrityError
from ..files import sha256_file
from ..geolocator import Geolocator
from ..inputs.discover import read_input_bytes, sha256_of
from ..results import Failure
from ..retrieval.photos import GALLERY_MANIFEST_FILE as GALLERY_MANIFEST
from ..runs.records import IDENTITY_FIELDS, Record, identity, record_of, utc_now
from ..runs.resume import ImageIndex
from .nodecheck import verify_once


@attrs.frozen
class DoneSet:
    """What a resumed run's read tasks skip: each image its folder holds (an :class:`ImageIndex` of its
    latest records, cut to path, absolute path and sha256: small enough to send to every task) and
    which of them are done under this run's identity (``done``: their groups)."""

    index: ImageIndex
    done: frozenset[int]

    @classmethod
    def of(cls, index: ImageIndex, ident: Mapping[str, Any], *, retry_failed: bool) -> DoneSet:
        """The done set of a resumed run's ``index``: an image is done when its latest record was made
        under ``ident`` (and, with ``retry_failed``, is no failure)."""
        cut, done = ImageIndex(), set()
        for rec in index.records.values():
            ok = rec.made_under(ident) and not (retry_failed and rec.status == "error")
            held = {"path": rec.path, "abs_path": rec.abs_path, "image_sha256": rec.image_sha256}
            g = cut.add(Record.from_dict(held, strict=False))
            done.discard(g)  # the latest record of an image decides, as the index does
            if ok:
                done.add(g)
        return cls(cut, frozenset(done))

    def done_record(self, path: str, abs_path: str | None, sha: str | None) -> Record | None:
        """The (cut) latest record of the image ``path`` names, when that image is done; else None."""
        g = self.index.find(path, abs_path, sha)
        return self.index.records[g] if g is not None and g in self.done else None


_DONE_CACHE: dict[str, DoneSet] = {}


def decode_path(value: Any) -> str:
    """Paths travel as bytes (``os.fsencode``: any file name survives Arrow); input lists give strings."""
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


def _objects(xs: list[Any]) -> np.ndarray:
    return np.array(xs, dtype=object)


def _done(done_ref: list[Any]) -> DoneSet:
    """The resume set, fetched once per worker process."""
    ref = done_ref[0]
    key = ref.hex()
    if key not in _DONE_CACHE:
        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    return _DONE_CACHE[key]


def read_and_hash(batch: dict[str, np.ndarray], *, done_ref: list[Any], base: str) -> dict[str, np.ndarray]:
    """Read each input's bytes and sha256 (as the single-machine runner does); inputs already done
    under this run's identity (a :class:`DoneSet`) with the same sha256 are marked ``skip`` and
    carry no bytes."""
    done = _done(done_ref)
    paths = [decode_path(p) for p in batch["path"]]
    files, shas, readable, skip, data = [], [], [], [], []
    for path in paths:
        file = os.path.abspath(path if os.path.isabs(path) else os.path.join(base, path))
        raw = read_input_bytes(Path(file))
        sha = sha256_of(raw)
        held = done.done_record(path, file, sha)
        skipped = held is not None and held.image_sha256 == sha
        files.append(file)
        shas.append(sha or "")
        readable.append(raw is not None)
        skip.append(skipped)
        data.append(b"" if skipped or raw is None else raw)
    return {
        "path": _objects([os.fsencode(p) for p in paths]),
        "file": _objects(files),
        "sha256": _objects(shas),
        "readable": np.array(readable, dtype=bool),
        "skip": np.array(skip, dtype=bool),
        "data": _objects(data),
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
        ctx = ray.get_runtime_context()
        if verify:
            verify_once(bundle, ident["bundle_digest"], node=ctx.get_node_id(), job=ctx.get_job_id())
        self.geo = Geolocator.load(bundle, verify=False, max_in_flight=in_flight, **load)
        if gallery_manifest is not None:  # same rows (the identity) is not enough: same index settings too
            mine = sha256_file(Path(load["gallery"]) / GALLERY_MANIFEST)
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
            (decode_path(batch["path"][i]), str(batch["file"][i]), str(batch["sha256"][i]),
             bool(batch["readable"][i]), bytes(batch["data"][i]))
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
                status.append(Record.from_dict(rec, strict=False).status)
                records.append(json.dumps(rec))  # ASCII: lone surrogates of odd file names survive Arrow
        return {"path": _objects(paths), "status": _objects(status), "record": _objects(records)}
