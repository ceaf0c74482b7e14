"""The same batch job beyond one machine, on Ray Data (the ``cluster`` extra).

Owns: the cluster run (:func:`locate_on_ray`, ``clue2geo locate SOURCE --out DIR --ray``): listing the
inputs (a folder tree or a Parquet/CSV input list of paths), reading and hashing bytes on CPU tasks, an
actor pool whose actors each hold one :class:`~clue2geo_sdk.Geolocator`, and the result *shards* it
writes under ``DIR/shards`` (JSONL, each sealed with a Parquet twin), merged into ``DIR/results.jsonl``.

Importing this package imports nothing of Ray: :mod:`.shards` (reading and merging shards, used by
``clue2geo export`` and ``report``) needs only the runtime, and the Ray job (:mod:`.job`) is imported
when a cluster run starts. Without Ray installed, :func:`locate_on_ray` raises
:class:`~clue2geo_sdk.MissingExtraError` naming ``pip install 'clue2geo[cluster]'``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import MissingExtraError
from .shards import MERGED, is_run_dir, merged_records, read_shards

if TYPE_CHECKING:
    from .job import ClusterSummary


def require_ray(purpose: str = "a cluster run (--ray)") -> None:
    """Raise :class:`MissingExtraError` (naming the ``cluster`` extra) unless Ray Data is importable."""
    for module in ("ray", "ray.data", "pyarrow"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtraError(module.split(".")[0], "cluster", purpose) from exc


def locate_on_ray(*args: Any, **kwargs: Any) -> ClusterSummary:
    """Geolocate every input on a Ray cluster into the folder ``out``; see :func:`.job.locate_on_ray`."""
    require_ray()
    from .job import locate_on_ray as run  # the cluster extra: the job imports ray, this package must not

    return run(*args, **kwargs)


__all__ = ["MERGED", "is_run_dir", "locate_on_ray", "merged_records", "read_shards", "require_ray"]
