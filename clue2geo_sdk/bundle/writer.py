"""Writing and replacing bundles without ever leaving a target folder half-written (DESIGN §2).

:class:`BundleWriter` builds in a hidden sibling folder and renames it into place only once the manifest
is written and verified, so a killed build never costs the previous bundle. Replacing a bundle deletes
only what its manifest lists: a folder that merely looks like a bundle may hold the user's own files.
Folder locks (``flock``) tell a killed build's leftovers from a running build's.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no folder locks, so leftovers of killed builds are left alone
    fcntl = None  # type: ignore[assignment]

from .._version import __version__
from ..errors import BundleExistsError, BundleFormatError, BundleNotFoundError
from ..files import fsync_path, sha256_file
from .components import ROLES, Component, ComponentFile
from .manifest import BUNDLE_FORMAT_VERSION, MANIFEST_FILE, Bundle
from .parse import escapes, parse_files, read_manifest_bytes
from .signing import SIGNATURES

# -- replacing a bundle: only what its manifest lists goes ------------------------------------


def _listed_files(root: Path) -> set[str]:
    """The files a bundle folder's manifest owns (relative posix paths; the manifest and its signatures
    included). Only the file lists are parsed: an old bundle whose parameters this SDK would refuse can
    still be replaced, but one whose list points outside its folder cannot."""
    manifest = root / MANIFEST_FILE
    data = read_manifest_bytes(manifest)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BundleFormatError(f"{manifest}: not valid JSON ({exc})") from None
    comps = raw.get("components") if isinstance(raw, dict) else None
    if not isinstance(comps, list):
        raise BundleFormatError(f"{manifest}: 'components' must be a list")
    owned = {MANIFEST_FILE, SIGNATURES}  # signatures of the old manifest go with it
    inside = root.resolve()
    for i, c in enumerate(comps):
        role = str(c.get("role")) if isinstance(c, dict) else "?"
        files = parse_files(c.get("files") if isinstance(c, dict) else None, role, f"{manifest} components[{i}]")
        for key, f in files.items():
            if escapes(inside, f.path):
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
    if not (root / MANIFEST_FILE).is_file():
        raise BundleExistsError(
            f"{root} is not empty and holds no bundle ({MANIFEST_FILE}); refusing to delete it: "
            "choose a new or empty folder"
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
    for rel in sorted(set(owned) - {MANIFEST_FILE}) + [MANIFEST_FILE]:
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
            f"{root} is not empty; choose a new or empty folder{hint if (root / MANIFEST_FILE).is_file() else ''}"
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


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder of a build: a power cut after the swap must not leave a bundle
    whose manifest is on disk but whose files are not."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


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
            elif kind == "replaced" and not os.path.lexists(target) and (entry / MANIFEST_FILE).is_file():
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
            "format_version": BUNDLE_FORMAT_VERSION,
            "sdk_version": __version__,
            "name": self.name,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "demo": self.demo,
            **self.extra,
            "components": [c.to_dict() for c in sorted(self.components, key=lambda c: ROLES.index(c.role))],
        }
        try:
            text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
            (self.root / MANIFEST_FILE).write_text(text, encoding="utf-8")
            Bundle.open(self.root, verify=True)  # complete, intact and well-formed before it replaces anything
            _fsync_tree(self.root)
            self._move_into_place()
        finally:
            self.abort()  # after the move: only releases the lock
        return self.target / MANIFEST_FILE

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
                fsync_path(parent)
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
                fsync_path(parent)
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
