"""The bundle: a directory whose ``manifest.json`` is the single source of truth (DESIGN §2).

Exporters write bundles with :class:`~clue2geo_sdk.bundle.writer.BundleWriter`; the runtime reads them
with :meth:`Bundle.open`. Only the manifest (JSON) is parsed; component files are hashed, never loaded.
The manifest's bytes are read once: parsed, hashed (:attr:`Bundle.digest`) and signature-checked from
the same bytes, and every parameter the runtime reads is type- and range-checked at open
(:mod:`clue2geo_sdk.bundle.parse`), so a hand-edited manifest is refused in one line instead of
crashing a later ``locate``. A bundle may be signed (Ed25519 over the manifest's sha256,
``signatures.json`` beside it; :mod:`clue2geo_sdk.bundle.signing`): ``Bundle.open(path,
trusted_keys=[...])`` refuses one that no trusted key signed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from .._version import __version__
from ..errors import BundleFormatError, BundleIntegrityError, BundleNotFoundError, InvalidArgumentError
from ..files import sha256_file
from .components import Component, models_digest
from .parse import check_header, check_paths, load_manifest, parse_components, read_manifest_bytes
from .signing import check_signatures

BUNDLE_FORMAT_VERSION = "1.0"  # of the manifest; a photo gallery's format has its own version
MANIFEST_FILE = "manifest.json"
_KNOWN = frozenset({"format_version", "sdk_version", "name", "created", "demo", "components"})


def _check_format_version(value: Any, manifest: Path) -> None:
    """Refuse a manifest of a newer major format than this SDK reads (a minor bump stays readable)."""
    try:
        major = int(str(value).split(".")[0])
    except ValueError:
        raise BundleFormatError(f"{manifest}: format_version {value!r} is not 'MAJOR.MINOR'") from None
    supported = int(BUNDLE_FORMAT_VERSION.split(".")[0])
    if major > supported:
        raise BundleFormatError(
            f"{manifest}: format_version {value} is newer than this SDK reads ({BUNDLE_FORMAT_VERSION}, "
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
        bundle = cls._read(Path(path).expanduser())
        if trusted_keys is not None:  # before hashing gigabytes: a bad signature is refused at once
            signed = check_signatures(bundle.root, bundle.digest, trusted_keys, name=bundle.name)
            bundle = attrs.evolve(bundle, signed_by=tuple(signed))
        if verify:
            bundle.verify()
        return bundle

    @classmethod
    def _read(cls, root: Path) -> Bundle:
        """The bundle as its manifest describes it, every check of the manifest passed; files unread."""
        if not root.is_dir():
            raise BundleNotFoundError(
                f"bundle directory {str(root)!r} does not exist; build the demo bundle with "
                "'clue2geo bundle demo' or pass the directory of an exported bundle"
            )
        manifest = root / MANIFEST_FILE
        data = read_manifest_bytes(manifest)
        raw = load_manifest(data, manifest)
        _check_format_version(raw.get("format_version"), manifest)
        check_header(raw, manifest)
        components = parse_components(raw.get("components"), manifest)
        resolved_root = root.resolve()
        check_paths(components, resolved_root, manifest)
        return cls(
            root=resolved_root,
            name=str(raw.get("name", root.name)),
            format_version=str(raw["format_version"]),
            sdk_version=str(raw.get("sdk_version", "")),
            created=str(raw.get("created", "")),
            demo=bool(raw.get("demo", False)),
            components=components,
            extra={k: v for k, v in raw.items() if k not in _KNOWN},
            manifest_sha256=hashlib.sha256(data).hexdigest(),
        )

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
        return self.manifest_sha256 or sha256_file(self.root / MANIFEST_FILE)

    @property
    def models_digest(self) -> str:
        """sha256 of the model components alone (:func:`~clue2geo_sdk.bundle.components.models_digest`):
        what a validation or known-answer set was measured on; unchanged when one is attached."""
        return models_digest(self.components)

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
