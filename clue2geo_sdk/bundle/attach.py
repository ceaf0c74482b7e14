"""Adding a validation or a known-answer set to a finished bundle, so the manifest hashes it.

Only the roles in :data:`~clue2geo_sdk.bundle.components.ATTACHED_ROLES` can be attached, and only
when they were measured on this bundle's models (their ``models_digest`` matches): a validation of
another model must never pass for this one's. The files are copied into ``ROOT/ROLE/`` first and the
manifest is replaced in one atomic write, so a crash leaves the old manifest, which still verifies.
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
    folder = bundle.root / role
    folder.mkdir(exist_ok=True)
    entries: dict[str, ComponentFile] = {}
    for key, src in files.items():
        source = regular_file(src, f"{role} file {key!r}")
        dest = folder / source.name
        if source.resolve() != dest.resolve():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(source, tmp)
            fsync_path(tmp)
            tmp.replace(dest)
        entries[key] = ComponentFile(
            path=dest.relative_to(bundle.root).as_posix(), sha256=sha256_file(dest), bytes=dest.stat().st_size
        )
    comp = Component(role=role, files=entries, params=dict(params), provenance=dict(provenance or {}))
    _replace_component(bundle.root / MANIFEST_FILE, comp)
    old = bundle.components.get(role)
    kept = {f.path for f in entries.values()}
    for f in old.files.values() if old else ():
        if f.path not in kept:
            (bundle.root / f.path).unlink(missing_ok=True)
    return Bundle.open(bundle.root, verify=True)


def _replace_component(manifest: Path, comp: Component) -> None:
    """The manifest with ``comp`` in place of any component of its role, written all or nothing."""
    raw = json.loads(manifest.read_text(encoding="utf-8"))
    comps = [c for c in raw["components"] if c.get("role") != comp.role]
    raw["components"] = [*comps, comp.to_dict()]
    atomic_write(manifest, json.dumps(raw, indent=2) + "\n")
