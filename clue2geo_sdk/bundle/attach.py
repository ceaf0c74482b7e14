"""Adding a validation or a known-answer set to a finished bundle, so the manifest hashes it.

Only the roles in :data:`~clue2geo_sdk.bundle.components.ATTACHED_ROLES` can be attached, and only
when they were measured on this bundle's models (their ``models_digest`` matches): a validation of
another model must never pass for this one's. The files are copied into a new folder
``ROOT/ROLE/N/`` first, beside the files the manifest lists, and the manifest is replaced in one
atomic write, so a failure or a crash before it leaves the old manifest and its files, which still
verify.
The manifest's digest changes, so signatures made before no longer cover it: sign again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import BundleFormatError
from ..files import atomic_write, fsync_path, regular_file, sha256_file
from .components import ATTACHED_ROLES, Component, ComponentFile
from .manifest import MANIFEST_FILE, Bundle


def attach(
    bundle: Bundle,
    role: str,
    files: Mapping[str, str | Path],
    *,
    params: Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
) -> Bundle:
    """Copy ``files`` (key -> source path) into the bundle as component ``role`` (replacing an earlier
    one) and return the bundle reopened and verified. ``params["models_digest"]`` must be the bundle's."""
    if role not in ATTACHED_ROLES:
        raise BundleFormatError(f"cannot attach role {role!r}: only {', '.join(ATTACHED_ROLES)} can be attached")
    measured = params.get("models_digest")
    if measured != bundle.models_digest:
        raise BundleFormatError(
            f"cannot attach {role} to bundle {bundle.name!r}: it was made with models {measured}, this bundle's "
            f"models are {bundle.models_digest} (another bundle, or its models changed since)"
        )
    manifest = bundle.root / MANIFEST_FILE
    if sha256_file(manifest) != bundle.digest:
        raise BundleFormatError(f"{manifest} changed since bundle {bundle.name!r} was opened; open it again")
    sources = {key: regular_file(src, f"{role} file {key!r}") for key, src in files.items()}
    names = [p.name for p in sources.values()]
    if len(set(names)) != len(names):
        raise BundleFormatError(f"cannot attach {role}: two files have the same name ({', '.join(sorted(names))})")
    folder = _new_folder(bundle.root / role)
    try:
        entries = {key: _copy(source, folder, bundle.root) for key, source in sources.items()}
        fsync_path(folder)  # the new names, once: the manifest must not list a file a power cut would lose
        comp = Component(role=role, files=entries, params=dict(params), provenance=dict(provenance or {}))
        _replace_component(manifest, comp)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # the manifest still lists the old files only
        raise
    old = bundle.components.get(role)
    for f in old.files.values() if old else ():
        (bundle.root / f.path).unlink(missing_ok=True)
        _remove_empty_parents(bundle.root / f.path, bundle.root / role)
    return Bundle.open(bundle.root, verify=True)


def _copy(source: Path, folder: Path, root: Path) -> ComponentFile:
    """``source`` copied into ``folder`` and flushed to disk, as the manifest will list it."""
    dest = folder / source.name
    shutil.copyfile(source, dest)
    fsync_path(dest)
    return ComponentFile(path=dest.relative_to(root).as_posix(), sha256=sha256_file(dest), bytes=dest.stat().st_size)


def _new_folder(parent: Path) -> Path:
    """``parent/N`` for the first N not taken: each attach writes beside the files the manifest still
    lists, so until the manifest is replaced the bundle verifies as it was."""
    parent.mkdir(exist_ok=True)
    n = 1
    while True:
        try:
            (parent / str(n)).mkdir()
            return parent / str(n)
        except FileExistsError:
            n += 1


def _remove_empty_parents(path: Path, stop: Path) -> None:
    """Remove the folders between ``path`` and ``stop`` (exclusive) that are now empty."""
    for folder in path.parents:
        if folder == stop or not folder.is_relative_to(stop):
            return
        try:
            folder.rmdir()
        except OSError:
            return


def _replace_component(manifest: Path, comp: Component) -> None:
    """The manifest with ``comp`` in place of any component of its role, written all or nothing."""
    raw = json.loads(manifest.read_text(encoding="utf-8"))
    comps = [c for c in raw["components"] if c.get("role") != comp.role]
    raw["components"] = [*comps, comp.to_dict()]
    atomic_write(manifest, json.dumps(raw, indent=2) + "\n")
