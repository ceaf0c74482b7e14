"""The bundle: a directory whose ``manifest.json`` is the single source of truth (DESIGN §2).

Exporters write bundles with :class:`BundleWriter`; the runtime reads them with :meth:`Bundle.open`.
Only the manifest (JSON) is parsed here; component files are hashed, never loaded. A bundle may be
signed (Ed25519 over the manifest's sha256, ``signatures.json`` beside it; :mod:`clue2geo_sdk.signing`):
``Bundle.open(path, trusted_keys=[...])`` refuses one that no trusted key signed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ._version import __version__
from .errors import BundleExistsError, BundleFormatError, BundleIntegrityError, BundleNotFoundError

FORMAT_VERSION = "1.0"
MANIFEST = "manifest.json"
ROLES: tuple[str, ...] = ("vlm", "clip", "gpsclip", "sbert", "gallery", "metadata")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@attrs.frozen(kw_only=True)
class ComponentFile:
    """One file of a component: where it is (relative to the bundle) and what its bytes must be."""

    path: str
    sha256: str
    bytes: int


@attrs.frozen(kw_only=True)
class Component:
    """One role of the bundle: its files, the parameters the runtime needs, and where it came from."""

    role: str
    files: Mapping[str, ComponentFile]
    params: Mapping[str, Any] = attrs.field(factory=dict)
    provenance: Mapping[str, Any] = attrs.field(factory=dict)
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "files": {k: attrs.asdict(f) for k, f in self.files.items()},
            "params": dict(self.params),
            "provenance": dict(self.provenance),
            "random_weights": self.random_weights,
        }


def _parse_component(raw: Any, where: str) -> Component:
    if not isinstance(raw, dict):
        raise BundleFormatError(f"{where}: a component must be a JSON object, got {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        raise BundleFormatError(f"{where}: unknown role {role!r}; known roles are {', '.join(ROLES)}")
    files_raw = raw.get("files")
    if not isinstance(files_raw, dict) or not files_raw:
        raise BundleFormatError(f"{where} (role {role}): 'files' must be a non-empty object")
    files: dict[str, ComponentFile] = {}
    for key, f in files_raw.items():
        try:
            files[key] = ComponentFile(path=str(f["path"]), sha256=str(f["sha256"]), bytes=int(f["bytes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleFormatError(
                f"{where} (role {role}), file {key!r}: needs 'path', 'sha256' and 'bytes' ({exc})"
            ) from None
    return Component(
        role=role,
        files=files,
        params=dict(raw.get("params") or {}),
        provenance=dict(raw.get("provenance") or {}),
        random_weights=bool(raw.get("random_weights", False)),
    )


def _check_format_version(value: Any, manifest: Path) -> None:
    try:
        major = int(str(value).split(".")[0])
    except ValueError:
        raise BundleFormatError(f"{manifest}: format_version {value!r} is not 'MAJOR.MINOR'") from None
    supported = int(FORMAT_VERSION.split(".")[0])
    if major > supported:
        raise BundleFormatError(
            f"{manifest}: format_version {value} is newer than this SDK reads ({FORMAT_VERSION}, "
            f"clue2geo {__version__}); upgrade clue2geo to open this bundle"
        )


@attrs.frozen(kw_only=True)
class Bundle:
    """An opened bundle directory. Open with :meth:`Bundle.open`; read paths with :meth:`file`."""

    root: Path
    name: str
    format_version: str
    sdk_version: str
    created: str
    demo: bool
    components: Mapping[str, Component]
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    signed_by: tuple[str, ...] = ()  # ids of the trusted keys whose signature was checked at open

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, trusted_keys: Iterable[Any] | None = None) -> Bundle:
        """Read and check ``manifest.json``; with ``verify`` also check every file's size and sha256.

        ``trusted_keys`` (Ed25519 public keys: key objects, PEM / OpenSSH / hex text, or key file paths)
        requires a signature by one of them over this manifest, else :class:`~clue2geo_sdk.signing.
        BundleSignatureError`; the signature covers the manifest and the manifest the files, so it needs
        ``verify=True``."""
        if trusted_keys is not None and not verify:
            raise ValueError(
                "trusted_keys needs verify=True: the signature covers the manifest, and only the sha256 check "
                "ties the files to it"
            )
        root = Path(path).expanduser()
        manifest = root / MANIFEST
        if not root.is_dir():
            raise BundleNotFoundError(
                f"bundle directory {str(root)!r} does not exist; build the demo bundle with "
                "'clue2geo bundle demo' or pass the directory of an exported bundle"
            )
        if not manifest.is_file():
            raise BundleNotFoundError(f"{str(root)!r} has no {MANIFEST}; is it a clue2geo bundle?")
        try:
            raw = json.loads(manifest.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleFormatError(f"{manifest}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise BundleFormatError(f"{manifest}: top level must be a JSON object")
        _check_format_version(raw.get("format_version"), manifest)
        comps_raw = raw.get("components")
        if not isinstance(comps_raw, list):
            raise BundleFormatError(f"{manifest}: 'components' must be a list")
        components: dict[str, Component] = {}
        for i, c in enumerate(comps_raw):
            comp = _parse_component(c, f"{manifest} components[{i}]")
            if comp.role in components:
                raise BundleFormatError(f"{manifest}: role {comp.role!r} appears twice")
            components[comp.role] = comp
        missing = [r for r in ROLES if r not in components]
        if missing:
            raise BundleFormatError(f"{manifest}: missing component role(s): {', '.join(missing)}")
        resolved_root = root.resolve()
        for comp in components.values():
            for key, f in comp.files.items():
                target = (resolved_root / f.path).resolve()
                if Path(f.path).is_absolute() or not target.is_relative_to(resolved_root):
                    raise BundleFormatError(
                        f"{manifest}: role {comp.role}, file {key!r}: path {f.path!r} escapes the bundle "
                        "directory; component paths must be relative and stay inside it"
                    )
        known = {"format_version", "sdk_version", "name", "created", "demo", "components"}
        bundle = cls(
            root=resolved_root,
            name=str(raw.get("name", root.name)),
            format_version=str(raw["format_version"]),
            sdk_version=str(raw.get("sdk_version", "")),
            created=str(raw.get("created", "")),
            demo=bool(raw.get("demo", False)),
            components=components,
            extra={k: v for k, v in raw.items() if k not in known},
        )
        if trusted_keys is not None:  # before hashing gigabytes: a bad signature is refused at once
            from .signing import check_signatures

            signed = check_signatures(resolved_root, bundle.digest, trusted_keys, name=bundle.name)
            bundle = attrs.evolve(bundle, signed_by=tuple(signed))
        if verify:
            bundle.verify()
        return bundle

    def component(self, role: str) -> Component:
        if role not in self.components:
            raise KeyError(f"bundle {self.name!r} has no component {role!r}")
        return self.components[role]

    def file(self, role: str, key: str) -> Path:
        """Absolute path of one component file, e.g. ``bundle.file("vlm", "mmproj")``."""
        comp = self.component(role)
        if key not in comp.files:
            raise KeyError(f"component {role!r} has no file {key!r}; it has {', '.join(comp.files)}")
        return self.root / comp.files[key].path

    def params(self, role: str) -> Mapping[str, Any]:
        return self.component(role).params

    @property
    def digest(self) -> str:
        """sha256 of the manifest: identifies this exact bundle in results and metrics."""
        return sha256_file(self.root / MANIFEST)

    def verify(self) -> None:
        """Check every component file exists with the recorded size and sha256; raise on the first fault."""
        for comp in self.components.values():
            for key, f in comp.files.items():
                path = self.root / f.path
                if not path.is_file():
                    raise BundleIntegrityError(f"bundle {self.name!r}: {comp.role} file {key!r} is missing: {path}")
                size = path.stat().st_size
                actual = sha256_file(path)
                if actual != f.sha256:
                    raise BundleIntegrityError(
                        f"bundle {self.name!r}: {path} ({comp.role}/{key}) is corrupt: "
                        f"manifest sha256 {f.sha256}, file sha256 {actual} ({size} bytes, "
                        f"manifest says {f.bytes})"
                    )

    def info(self) -> dict[str, Any]:
        """A JSON-ready summary: identity, flags and each component's files, sizes and parameters."""
        return {
            "name": self.name,
            "path": str(self.root),
            "format_version": self.format_version,
            "sdk_version": self.sdk_version,
            "created": self.created,
            "demo": self.demo,
            "bytes": sum(f.bytes for c in self.components.values() for f in c.files.values()),
            "components": [c.to_dict() for c in self.components.values()],
            **dict(self.extra),
        }


def remove_bundle(root: Path) -> None:
    """Delete a bundle: its manifest, the files the manifest lists, then folders left empty.

    Refuses, before deleting anything, when ``root`` holds no manifest or holds any file the manifest
    does not list: a folder that only looks like a bundle may hold the user's own files.
    """
    if not (root / MANIFEST).is_file():
        raise BundleExistsError(
            f"{root} is not empty and holds no bundle ({MANIFEST}); refusing to delete it: choose a new or empty folder"
        )
    try:
        bundle = Bundle.open(root, verify=False)
    except (BundleFormatError, BundleNotFoundError) as exc:
        raise BundleExistsError(
            f"{root}: cannot tell which files the old bundle owns ({exc}); nothing deleted"
        ) from None
    from .signing import SIGNATURES  # signatures of the old manifest go with it

    owned = {MANIFEST, SIGNATURES} | {
        Path(f.path).as_posix() for c in bundle.components.values() for f in c.files.values()
    }
    found, folders = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        folders.append(here)
        for d in dirnames:  # a link to a folder is an entry, not a folder to walk
            if (here / d).is_symlink():
                filenames.append(d)
        found += [(here / f).relative_to(root).as_posix() for f in filenames]
    foreign = sorted(set(found) - owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BundleExistsError(
            f"{root} holds {len(foreign)} file(s) that are not part of its bundle ({shown}); nothing deleted. "
            "Move them away (or remove the folder yourself) and try again"
        )
    for rel in sorted(owned & set(found)):
        (root / rel).unlink()
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        if folder != root and not any(folder.iterdir()):
            folder.rmdir()


class BundleWriter:
    """Builds a bundle directory: copy component files in, record their digests, write the manifest."""

    def __init__(self, root: str | Path, *, name: str, demo: bool, overwrite: bool = False) -> None:
        self.root = Path(root)
        if self.root.is_dir() and any(self.root.iterdir()):
            if not overwrite:
                hint = ", or pass --overwrite (overwrite=True) to replace the bundle in it"
                raise BundleExistsError(
                    f"{self.root} is not empty; choose a new or empty folder{hint if self._has_manifest() else ''}"
                )
            remove_bundle(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.demo = demo
        self.components: list[Component] = []
        self.extra: dict[str, Any] = {}

    def _has_manifest(self) -> bool:
        return (self.root / MANIFEST).is_file()

    def add(
        self,
        role: str,
        files: Mapping[str, str | Path],
        *,
        params: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
        random_weights: bool = False,
    ) -> Component:
        """Register files already written inside the bundle directory."""
        if role not in ROLES:
            raise BundleFormatError(f"unknown role {role!r}; known roles are {', '.join(ROLES)}")
        entries: dict[str, ComponentFile] = {}
        for key, p in files.items():
            path = Path(p).resolve()
            if not path.is_relative_to(self.root.resolve()):
                raise BundleFormatError(f"{role}/{key}: {path} is not inside the bundle directory {self.root}")
            rel = path.relative_to(self.root.resolve())
            entries[key] = ComponentFile(path=rel.as_posix(), sha256=sha256_file(path), bytes=path.stat().st_size)
        comp = Component(
            role=role,
            files=entries,
            params=dict(params or {}),
            provenance=dict(provenance or {}),
            random_weights=random_weights,
        )
        self.components = [c for c in self.components if c.role != role] + [comp]
        return comp

    def write(self) -> Path:
        manifest = {
            "format_version": FORMAT_VERSION,
            "sdk_version": __version__,
            "name": self.name,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "demo": self.demo,
            **self.extra,
            "components": [c.to_dict() for c in sorted(self.components, key=lambda c: ROLES.index(c.role))],
        }
        out = self.root / MANIFEST
        out.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        return out
