"""The bundle: a directory whose ``manifest.json`` is the single source of truth (DESIGN §2).

Exporters write bundles with :class:`BundleWriter`; the runtime reads them with :meth:`Bundle.open`.
Only the manifest (JSON) is parsed here; component files are hashed, never loaded. The manifest's
bytes are read once: parsed, hashed (:attr:`Bundle.digest`) and signature-checked from the same bytes,
and every parameter the runtime reads is type- and range-checked at open (``_PARAMS``), so a hand-edited
manifest is refused in one line instead of crashing a later ``locate``. A bundle may be signed (Ed25519
over the manifest's sha256, ``signatures.json`` beside it; :mod:`clue2geo_sdk.bundle.signing`):
``Bundle.open(path, trusted_keys=[...])`` refuses one that no trusted key signed.

:class:`BundleWriter` builds in a hidden sibling folder and renames it into place only once the manifest
is written and verified, so a killed build never costs the previous bundle (DESIGN §2).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

try:
    import fcntl
except ImportError:  # not POSIX: no folder locks, so leftovers of killed builds are left alone
    fcntl = None  # type: ignore[assignment]

from .._version import __version__
from ..errors import (
    BundleExistsError,
    BundleFormatError,
    BundleIntegrityError,
    BundleNotFoundError,
    InvalidArgumentError,
)

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


# -- manifest schema: what the runtime reads, checked once at open -------------------------------

_MISSING = object()

_Check = Callable[[Any], str | None]  # None when the value is fine, else what was expected
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_MANIFEST_BYTES = 64 << 20  # real manifests are tens of KB; this only stops an endless read


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(lo: int, hi: int) -> _Check:
    return lambda v: None if _is_int(v) and lo <= v <= hi else f"an integer from {lo} to {hi}"


def _number(lo: float, hi: float, *, above_lo: bool = False) -> _Check:
    what = f"a number {'above' if above_lo else 'from'} {lo:g} {'and at most' if above_lo else 'to'} {hi:g}"

    def check(v: Any) -> str | None:
        ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v) and (v > lo if above_lo else v >= lo)
        return None if ok and v <= hi else what

    return check


def _numbers(n: int, item: _Check, what: str) -> _Check:
    return lambda v: None if isinstance(v, list) and len(v) == n and all(item(x) is None for x in v) else what


def _hex64(v: Any) -> str | None:
    return None if isinstance(v, str) and _HEX64.fullmatch(v) else "a sha256: 64 lowercase hex characters"


def _or_null(check: _Check) -> _Check:
    return lambda v: None if v is None or check(v) is None else f"null or {check(v)}"


def _str_map(v: Any) -> str | None:
    ok = isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
    return None if ok else "an object of name -> template text (strings)"


def _fp16(v: Any) -> str | None:
    """Per tower, the float16 verdict the encoders read: ``ok`` and the graph optimization level."""
    what = 'an object of tower -> {"ok": true/false, "graph_optimization": "basic"|"extended"|"all"|null}'
    if not isinstance(v, dict):
        return what
    for verdict in v.values():
        if not isinstance(verdict, dict) or not isinstance(verdict.get("ok", False), bool):
            return what
        if verdict.get("graph_optimization") not in (None, "basic", "extended", "all"):
            return what
    return None


_IMAGE_SIZE = _int(16, 4096)
_DIM = _int(1, 65536)
_MEAN = _numbers(3, _number(-10.0, 10.0), "a list of 3 numbers (one per RGB channel) from -10 to 10")
_STD = _numbers(3, _number(0.0, 10.0, above_lo=True), "a list of 3 numbers (one per RGB channel) above 0, at most 10")
_GRID = _numbers(2, _int(1, 16), "[rows, columns], two integers from 1 to 16")

# role -> the files the runtime opens, and params field -> (required, check). Fields with a runtime
# default are optional; nested fields are named with a dot. Unknown fields are kept as they are.
_FILES: dict[str, tuple[str, ...]] = {
    "vlm": ("model", "mmproj"),
    "clip": ("image", "text", "tokenizer"),
    "gpsclip": ("image", "location"),
    "sbert": ("model", "tokenizer"),
    "gallery": ("index",),
    "metadata": ("db",),
}
_PARAMS: dict[str, dict[str, tuple[bool, _Check]]] = {
    "vlm": {
        "n_ctx": (False, _int(64, 1 << 20)),
        "image_max_tokens": (False, _or_null(_int(1, 1 << 16))),
        "prompts": (False, _or_null(_str_map)),
        "generation": (False, lambda v: None if isinstance(v, dict) else "a JSON object"),
        "generation.temperature": (False, _number(0.0, 100.0)),
    },
    "clip": {
        "image_size": (True, _IMAGE_SIZE),
        "mean": (True, _MEAN),
        "std": (True, _STD),
        "embed_dim": (True, _DIM),
        "patch_grid": (False, _GRID),
        "fp16": (False, _fp16),
    },
    "gpsclip": {
        "image_size": (True, _IMAGE_SIZE),
        "mean": (True, _MEAN),
        "std": (True, _STD),
        "dim": (True, _DIM),
        "fp16": (False, _fp16),
    },
    "sbert": {"dim": (True, _DIM), "max_length": (False, _int(1, 65536))},
    "gallery": {"dim": (True, _DIM), "encoder_sha256": (True, _hex64)},
    "metadata": {},
}


def _shown(value: Any) -> str:
    """A value as JSON on one line, cut short: a message must stay one readable line."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_params(role: str, params: Mapping[str, Any], where: str) -> None:
    """Refuse, naming component, field, value and what is expected, a parameter the runtime would choke on."""
    where = f"{where}: component {role!r}"
    for field, (required, check) in _PARAMS[role].items():
        node: Any = params
        for part in field.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is _MISSING:
            if required:
                raise BundleFormatError(f"{where}, params.{field} is missing: expected {check(None)}")
            continue
        expected = check(node)
        if expected is not None:
            raise BundleFormatError(f"{where}, params.{field} is {_shown(node)}: expected {expected}")
    vlm_ctx, vlm_img = params.get("n_ctx"), params.get("image_max_tokens")
    if role == "vlm" and _is_int(vlm_ctx) and _is_int(vlm_img) and vlm_img >= vlm_ctx:
        raise BundleFormatError(
            f"{where}, params.image_max_tokens is {vlm_img} but params.n_ctx is {vlm_ctx}: "
            "expected n_ctx above image_max_tokens (the image alone takes that many context cells)"
        )


def _parse_files(raw: Any, role: str, where: str) -> dict[str, ComponentFile]:
    if not isinstance(raw, dict) or not raw:
        raise BundleFormatError(f"{where}: component {role!r}, 'files' must be a non-empty object")
    files: dict[str, ComponentFile] = {}
    for key, f in raw.items():
        bad = None
        if not isinstance(f, dict):
            bad = f"is {_shown(f)}: expected an object with 'path', 'sha256' and 'bytes'"
        elif not isinstance(f.get("path"), str) or not f["path"]:
            bad = f"path is {_shown(f.get('path'))}: expected a relative path (a non-empty string)"
        elif _hex64(f.get("sha256")) is not None:
            bad = f"sha256 is {_shown(f.get('sha256'))}: expected {_hex64(None)}"
        elif not _is_int(f.get("bytes")) or f["bytes"] < 0:
            bad = f"bytes is {_shown(f.get('bytes'))}: expected a file size (an integer, 0 or more)"
        if bad:
            raise BundleFormatError(f"{where}: component {role!r}, file {key!r} {bad}")
        files[key] = ComponentFile(path=f["path"], sha256=f["sha256"], bytes=f["bytes"])
    return files


def _parse_component(raw: Any, where: str) -> Component:
    if not isinstance(raw, dict):
        raise BundleFormatError(f"{where}: a component must be a JSON object, got {_shown(raw)}")
    role = raw.get("role")
    if role not in ROLES:
        raise BundleFormatError(f"{where}: unknown role {role!r}; known roles are {', '.join(ROLES)}")
    files = _parse_files(raw.get("files"), role, where)
    missing = [k for k in _FILES[role] if k not in files]
    if missing:
        raise BundleFormatError(
            f"{where}: component {role!r} has no file {missing[0]!r}: expected files {', '.join(_FILES[role])}"
        )
    for field, default in (("params", {}), ("provenance", {})):
        value = raw.get(field, default)
        if not isinstance(value, dict):
            raise BundleFormatError(f"{where}: component {role!r}, {field} is {_shown(value)}: expected a JSON object")
    if not isinstance(raw.get("random_weights", False), bool):
        raise BundleFormatError(
            f"{where}: component {role!r}, random_weights is {_shown(raw['random_weights'])}: expected true or false"
        )
    params = dict(raw.get("params", {}))
    _check_params(role, params, where)
    return Component(
        role=role,
        files=files,
        params=params,
        provenance=dict(raw.get("provenance", {})),
        random_weights=raw.get("random_weights", False),
    )


def _read_manifest(root: Path) -> bytes:
    """The manifest's bytes, read once; anything but a regular file is refused before reading (a FIFO
    named manifest.json would block the open for ever)."""
    manifest = root / MANIFEST
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BundleNotFoundError(f"{str(root)!r} has no {MANIFEST}; is it a clue2geo bundle?") from None
    except OSError as exc:
        raise BundleFormatError(f"{manifest}: cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BundleNotFoundError(f"{manifest} is not a regular file; is {str(root)!r} a clue2geo bundle?")
        try:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise BundleFormatError(f"{manifest}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleFormatError(f"{manifest}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; not a bundle manifest")
    return data


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
    manifest_sha256: str | None = None  # of the very bytes parsed at open (see :attr:`digest`)

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True, trusted_keys: Iterable[Any] | None = None) -> Bundle:
        """Read and check ``manifest.json``; with ``verify`` also check every file's size and sha256.

        ``trusted_keys`` (Ed25519 public keys: key objects, PEM / OpenSSH / hex text, or key file paths)
        requires a signature by one of them over this manifest, else :class:`~clue2geo_sdk.bundle.signing.
        BundleSignatureError`; the signature covers the manifest and the manifest the files, so it needs
        ``verify=True``."""
        if trusted_keys is not None and not verify:
            raise InvalidArgumentError(
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
        data = _read_manifest(root)
        where = str(manifest)
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleFormatError(f"{manifest}: not valid JSON ({exc})") from None
        except RecursionError:
            raise BundleFormatError(f"{manifest}: not a bundle manifest (JSON nested too deeply)") from None
        if not isinstance(raw, dict):
            raise BundleFormatError(f"{manifest}: top level must be a JSON object")
        _check_format_version(raw.get("format_version"), manifest)
        for key, kind, check in (("name", "a string", str), ("created", "a string", str), ("demo", "true/false", bool)):
            if key in raw and not isinstance(raw[key], check):
                raise BundleFormatError(f"{manifest}: {key} is {_shown(raw[key])}: expected {kind}")
        comps_raw = raw.get("components")
        if not isinstance(comps_raw, list):
            raise BundleFormatError(f"{manifest}: 'components' must be a list")
        components: dict[str, Component] = {}
        for i, c in enumerate(comps_raw):
            comp = _parse_component(c, f"{where} components[{i}]")
            if comp.role in components:
                raise BundleFormatError(f"{manifest}: role {comp.role!r} appears twice")
            components[comp.role] = comp
        missing = [r for r in ROLES if r not in components]
        if missing:
            raise BundleFormatError(f"{manifest}: missing component role(s): {', '.join(missing)}")
        g_dim, l_dim = components["gallery"].params["dim"], components["gpsclip"].params["dim"]
        if g_dim != l_dim:  # the gallery holds GPSCLIP location embeddings, queried with its image embeddings
            raise BundleFormatError(
                f"{manifest}: component 'gallery', params.dim is {g_dim}: expected {l_dim}, the dim of component "
                "'gpsclip' whose embeddings it holds"
            )
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
            manifest_sha256=hashlib.sha256(data).hexdigest(),
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
        """sha256 of the manifest: identifies this exact bundle in results and metrics. It is the hash
        of the bytes that were parsed (and signature-checked) at open, never of a second read, which a
        concurrent writer could have changed in between."""
        return self.manifest_sha256 or sha256_file(self.root / MANIFEST)

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


# -- replacing a bundle: only what its manifest lists goes ------------------------------------


def _listed_files(root: Path) -> set[str]:
    """The files a bundle folder's manifest owns (relative posix paths; the manifest and its signatures
    included). Only the file lists are parsed: an old bundle whose parameters this SDK would refuse can
    still be replaced, but one whose list points outside its folder cannot."""
    from .signing import SIGNATURES  # signatures of the old manifest go with it

    manifest = root / MANIFEST
    data = _read_manifest(root)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleFormatError(f"{manifest}: not valid JSON ({exc})") from None
    comps = raw.get("components") if isinstance(raw, dict) else None
    if not isinstance(comps, list):
        raise BundleFormatError(f"{manifest}: 'components' must be a list")
    owned = {MANIFEST, SIGNATURES}
    inside = root.resolve()
    for i, c in enumerate(comps):
        role = str(c.get("role")) if isinstance(c, dict) else "?"
        files = _parse_files(c.get("files") if isinstance(c, dict) else None, role, f"{manifest} components[{i}]")
        for key, f in files.items():
            if Path(f.path).is_absolute() or not (inside / f.path).resolve().is_relative_to(inside):
                raise BundleFormatError(f"{manifest}: role {role}, file {key!r}: path {f.path!r} escapes the bundle")
            owned.add(Path(os.path.normpath(f.path)).as_posix())
    return owned


def _created_folders(owned: Iterable[str]) -> set[str]:
    """The folders a bundle made: those holding its files (relative posix paths, the root excluded)."""
    return {p.as_posix() for rel in owned for p in Path(rel).parents if p != Path(".")}


def _inventory(root: Path) -> tuple[set[str], list[str]]:
    """The files a bundle folder's manifest lists and all its sub-folders (relative posix paths).
    Refuses, deleting nothing, a folder without a readable manifest or holding any file the manifest
    does not list: a folder that only looks like a bundle may hold the user's own files."""
    if not (root / MANIFEST).is_file():
        raise BundleExistsError(
            f"{root} is not empty and holds no bundle ({MANIFEST}); refusing to delete it: choose a new or empty folder"
        )
    try:
        owned = _listed_files(root)
    except (BundleFormatError, BundleNotFoundError) as exc:
        raise BundleExistsError(
            f"{root}: cannot tell which files the old bundle owns ({exc}); nothing deleted"
        ) from None
    found, folders = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root:
            folders.append(here.relative_to(root).as_posix())
        # a link to a folder is an entry, not a folder to walk
        entries = filenames + [d for d in dirnames if (here / d).is_symlink()]
        found += [(here / f).relative_to(root).as_posix() for f in entries]
    foreign = sorted(set(found) - owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BundleExistsError(
            f"{root} holds {len(foreign)} file(s) that are not part of its bundle ({shown}); nothing deleted. "
            "Move them away (or remove the folder yourself) and try again"
        )
    return owned, folders


def _unlink_owned(root: Path, owned: Iterable[str]) -> None:
    """Delete listed files, the manifest last: a deletion cut short still names what is left."""
    for rel in sorted(set(owned) - {MANIFEST}) + [MANIFEST]:
        path = root / rel
        if path.is_symlink() or path.is_file():
            path.unlink()


def remove_bundle(root: Path) -> None:
    """Delete a bundle in place: the files its manifest lists (the manifest last), then the folders
    that held them once empty. The user's own folders, even empty ones, stay; so does ``root``.

    Refuses, before deleting anything, when ``root`` holds no manifest or holds any file the manifest
    does not list (see :func:`_inventory`)."""
    root = Path(root)
    owned, _ = _inventory(root)
    _unlink_owned(root, owned)
    for rel in sorted(_created_folders(owned), key=lambda r: r.count("/"), reverse=True):
        with_path = root / rel
        if with_path.is_dir() and not with_path.is_symlink() and not any(with_path.iterdir()):
            with_path.rmdir()


def check_target(root: str | Path, *, overwrite: bool) -> tuple[set[str], list[str]]:
    """The folder rules of a build, checked before any work and again before the new bundle moves in:
    ``root`` must be new or empty, or (with ``overwrite``) hold only a bundle. Deletes nothing.
    Returns the old bundle's listed files and all its sub-folders (empty when there is none)."""
    root = Path(root)
    if os.path.lexists(root) and not root.is_dir():
        raise BundleExistsError(f"{root} exists and is not a folder; choose a new or empty folder")
    if os.path.ismount(root):  # the finished bundle is renamed into place, which a mount point refuses
        raise BundleExistsError(
            f"{root} is a mount point; a bundle is built beside its folder and renamed into place: "
            f"choose a folder inside it (e.g. {root / 'demo'})"
        )
    if not root.is_dir() or not any(root.iterdir()):
        return set(), []
    if not overwrite:
        hint = ", or pass --overwrite (overwrite=True) to replace the bundle in it"
        raise BundleExistsError(
            f"{root} is not empty; choose a new or empty folder{hint if (root / MANIFEST).is_file() else ''}"
        )
    return _inventory(root)


# -- atomic builds: a hidden sibling folder, renamed into place when complete ------------------

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>building|replaced|deleting)-[0-9a-f]{8}")


def _lock(path: Path, *, block: bool = False) -> int | None:
    """An exclusive ``flock`` on a folder (its descriptor), or None when another live process holds it
    (or locks are not available). The kernel drops it when its holder dies, however it dies: that is
    how a killed build's leftovers are told from a running build's."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


class _Locked:
    """Holds a folder's lock for a ``with`` block: two builds of one target never swap at once."""

    def __init__(self, path: Path) -> None:
        self.fd = _lock(path, block=True)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        _unlock(self.fd)


def _fsync(path: Path) -> None:
    """Flush a file's or folder's data to disk: a power cut after the swap must not leave a bundle
    whose manifest is on disk but whose files are not. Filesystems without fsync are let be."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _discard_old(folder: Path) -> None:
    """Delete a replaced bundle moved aside: its listed files, then every folder left empty (the user's
    empty folders were recreated in the new bundle). A file it does not list is left, with a warning."""
    try:
        owned = _listed_files(folder)
    except (BundleFormatError, BundleNotFoundError):  # cut short after its manifest went: only folders left
        owned = set()
    _unlink_owned(folder, owned)
    for dirpath, _, _ in os.walk(folder, topdown=False):
        with contextlib.suppress(OSError):  # not empty: a file the manifest does not list
            Path(dirpath).rmdir()
    if folder.exists():
        warnings.warn(
            f"{folder}: left in place: it holds files the replaced bundle did not list; look at them and delete it",
            stacklevel=3,
        )


def _discard_aside(folder: Path) -> None:
    """Rename an old bundle moved aside to ``.deleting-``, then delete it: a deletion cut short is never
    mistaken for a whole old bundle to restore."""
    if ".replaced-" in folder.name:
        doomed = folder.with_name(folder.name.replace(".replaced-", ".deleting-", 1))
        os.rename(folder, doomed)
        folder = doomed
    _discard_old(folder)


def _clean_leftovers(target: Path) -> None:
    """Remove what killed builds of ``target`` left beside it: ``.NAME.building-*`` folders (all
    theirs), and old bundles moved aside. One moved aside while the target is missing (killed between
    the two renames of a swap) goes back into place. Folders a live build holds locked are not touched,
    nor anything whose name our builds would not give."""
    found = []
    for entry in target.parent.iterdir():
        m = _LEFTOVER.fullmatch(entry.name)
        if m and m["name"] == target.name and entry.is_dir() and not entry.is_symlink():
            with contextlib.suppress(OSError):  # gone meanwhile
                found.append((entry.stat().st_mtime, m["kind"], entry))
    for _, kind, entry in sorted(found, reverse=True):  # the newest old bundle is the one restored
        fd = _lock(entry)
        if fd is None:
            continue
        try:
            if kind == "building":
                shutil.rmtree(entry, ignore_errors=True)
            elif kind == "replaced" and not os.path.lexists(target) and (entry / MANIFEST).is_file():
                os.rename(entry, target)
            else:
                _discard_aside(entry)
        except OSError as exc:  # best effort: a leftover never blocks a build (its name is never reused)
            warnings.warn(f"{entry}: could not remove this leftover of an earlier build ({exc})", stacklevel=3)
        finally:
            _unlock(fd)


class BundleWriter:
    """Builds a bundle without ever leaving its target half-written.

    Component files go under :attr:`root`, a hidden folder beside the target
    (``.NAME.building-XXXXXXXX``, same disk); :meth:`add` registers them; :meth:`write` writes the
    manifest, verifies every file, and only then renames the folder into place (an old bundle there,
    with ``overwrite``, is renamed aside first and deleted after). Until that rename the target keeps
    its old bundle, or nothing, whatever happens to the build. Use it as a context manager: a failed
    build removes its folder at once; one killed outright is removed by the next build of the target.
    The folder rules (new or empty, or with ``overwrite`` only a bundle) are checked before any work.
    """

    def __init__(self, root: str | Path, *, name: str, demo: bool, overwrite: bool = False) -> None:
        self.target = Path(os.path.realpath(Path(root).expanduser()))  # a link to a folder: build where it points
        self.overwrite = overwrite
        self.name = name
        self.demo = demo
        self.components: list[Component] = []
        self.extra: dict[str, Any] = {}
        self._committed = False
        self.target.parent.mkdir(parents=True, exist_ok=True)
        with _Locked(self.target.parent):
            _clean_leftovers(self.target)
            check_target(self.target, overwrite=overwrite)
            for _ in range(100):
                staging = self.target.parent / f".{self.target.name}.building-{secrets.token_hex(4)}"
                try:
                    staging.mkdir()
                    break
                except FileExistsError:
                    continue
            self.root: Path = staging  # where component files are written until write()
            self._lock = _lock(staging)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def abort(self) -> None:
        """Remove the build folder unless :meth:`write` moved it into place; the target is untouched."""
        if not self._committed and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)
        _unlock(self._lock)
        self._lock = None

    def add(
        self,
        role: str,
        files: Mapping[str, str | Path],
        *,
        params: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
        random_weights: bool = False,
    ) -> Component:
        """Register files already written under :attr:`root` (the build folder)."""
        if role not in ROLES:
            raise BundleFormatError(f"unknown role {role!r}; known roles are {', '.join(ROLES)}")
        if self._committed:
            raise BundleFormatError(f"bundle {self.name!r} is already written to {self.target}; start a new writer")
        entries: dict[str, ComponentFile] = {}
        for key, p in files.items():
            path = Path(p).resolve()
            if not path.is_relative_to(self.root.resolve()):
                raise BundleFormatError(
                    f"{role}/{key}: {path} is not inside the build folder {self.root}; exporters write under "
                    "BundleWriter.root, which becomes the bundle at write()"
                )
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
        """Write the manifest, verify every file against it, then move the bundle into place; returns
        the manifest's final path. On any failure the build folder is removed and the target kept."""
        if self._committed:
            raise BundleFormatError(f"bundle {self.name!r} is already written to {self.target}")
        manifest = {
            "format_version": FORMAT_VERSION,
            "sdk_version": __version__,
            "name": self.name,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "demo": self.demo,
            **self.extra,
            "components": [c.to_dict() for c in sorted(self.components, key=lambda c: ROLES.index(c.role))],
        }
        try:
            (self.root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
            Bundle.open(self.root, verify=True)  # complete, intact and well-formed before it replaces anything
            _fsync_tree(self.root)
            self._move_into_place()
        finally:
            self.abort()  # after the move: only releases the lock
        return self.target / MANIFEST

    def _move_into_place(self) -> None:
        target, parent = self.target, self.target.parent
        with _Locked(parent):
            # the rules again: the folder may have changed during the build (nothing is deleted yet)
            owned, folders = check_target(target, overwrite=self.overwrite)
            self._carry_user_folders(owned, folders)
            if not target.is_dir() or not any(target.iterdir()):
                if target.is_dir():
                    os.chmod(self.root, stat.S_IMODE(target.stat().st_mode))
                self._rename(self.root, target)  # onto nothing, or onto an empty folder (replaced at once)
                self._committed = True
                _fsync(parent)
                return
            os.chmod(self.root, stat.S_IMODE(target.stat().st_mode))
            aside = parent / f".{target.name}.replaced-{secrets.token_hex(4)}"
            held = _lock(target)  # the old bundle stays ours while it is set aside and deleted
            try:
                self._rename(target, aside)
                try:
                    self._rename(self.root, target)
                except BaseException:
                    os.rename(aside, target)
                    raise
                self._committed = True
                _fsync(parent)
                try:
                    _discard_aside(aside)
                except OSError as exc:  # the new bundle is in place; the next build retries the deletion
                    warnings.warn(f"{aside}: the replaced bundle could not be deleted ({exc})", stacklevel=3)
            finally:
                _unlock(held)

    def _carry_user_folders(self, owned: set[str], folders: list[str]) -> None:
        """Recreate in the new bundle the folders of the old one that hold none of its files (the user's
        own, empty: the folder rules refuse any other file), so replacing the bundle keeps them."""
        made = _created_folders(owned)
        for rel in sorted((f for f in folders if f not in made), key=lambda r: r.count("/")):
            for part in [*reversed(Path(rel).parents[:-1]), Path(rel)]:
                here = self.root / part
                if os.path.lexists(here) and not here.is_dir():
                    raise BundleExistsError(
                        f"{self.target}: your folder {rel!r} is where the new bundle has the file "
                        f"{part.as_posix()!r}; nothing replaced. Move that folder away and build again"
                    )
            (self.root / rel).mkdir(parents=True, exist_ok=True)

    def _rename(self, src: Path, dst: Path) -> None:
        try:
            os.rename(src, dst)
        except OSError as exc:
            raise BundleExistsError(
                f"cannot move {src} to {dst} ({exc.strerror or exc}); the old bundle is unchanged. A mount point "
                "cannot be renamed: build into a folder inside it"
            ) from None
