"""Ed25519 signatures over a bundle's manifest (``cryptography``).

A bundle's ``manifest.json`` pins every component file by sha256, so signing the manifest's own
sha256 (the bundle's :attr:`~clue2geo_sdk.bundle.manifest.Bundle.digest`) signs the whole bundle. Signatures
live in ``signatures.json`` beside the manifest; several keys may sign one bundle (the builder, the
lab that accepted it). Each entry holds the key's public bytes and id, the UTC time it was signed
and the signature over ``MESSAGE_PREFIX + digest + "\\n" + signed_utc``.

Keys are read from PEM (PKCS#8 private keys, SubjectPublicKeyInfo public keys), an OpenSSH public
key line (``ssh-ed25519 AAAA...``) or 64 hex characters (the raw 32 bytes: the seed of a private key,
or a public key), given as text, bytes, a key object or the path of a file holding one of those.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import BundleIntegrityError, Clue2GeoError
from ..files import atomic_write

SIGNATURES = "signatures.json"
SIGNATURE_FORMAT = "clue2geo-bundle-signatures/1"
MESSAGE_PREFIX = b"clue2geo bundle manifest sha256 v1\n"
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")

S = TypeVar("S")
KeyInput = Any  # Ed25519 key object, PEM / OpenSSH / hex text or bytes, or a path to a file of one


class BundleSignatureError(BundleIntegrityError):
    """A bundle is unsigned, signed by no trusted key, or its signature does not match its manifest."""


class SigningKeyError(Clue2GeoError, ValueError):
    """A key cannot be read: the message names where it came from and the formats accepted."""


def public_bytes(key: Ed25519PublicKey) -> bytes:
    """The raw 32 bytes of a public key."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey | bytes) -> str:
    """A short name for a public key: the first 16 hex characters of the sha256 of its raw bytes."""
    raw = key if isinstance(key, bytes) else public_bytes(key)
    return hashlib.sha256(raw).hexdigest()[:16]


def _key_text(key: KeyInput, what: str) -> tuple[bytes, str]:
    """The key material as bytes, and a name for it in messages (a file is read)."""
    if isinstance(key, os.PathLike) or (isinstance(key, str) and not _looks_inline(key)):
        path = Path(key).expanduser()
        try:
            return path.read_bytes().strip(), str(path)
        except OSError as exc:
            raise SigningKeyError(f"{what} {str(path)!r}: cannot read the key file ({exc.strerror or exc})") from None
    if isinstance(key, str):
        return key.strip().encode("ascii", "replace"), f"the {what} given"
    return bytes(key).strip(), f"the {what} given"


def _looks_inline(text: str) -> bool:
    t = text.strip()
    return bool(_HEX.match(t)) or t.startswith("-----BEGIN") or t.startswith("ssh-ed25519 ")


_FORMATS = "PEM, an OpenSSH 'ssh-ed25519' line or 64 hex characters"


def load_private_key(key: KeyInput) -> Ed25519PrivateKey:
    """An Ed25519 private key from a key object, PEM (unencrypted PKCS#8), 64 hex characters (the
    32-byte seed), or the path of a file holding one."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    data, where = _key_text(key, "private key")
    try:
        if data.startswith(b"-----BEGIN"):
            loaded = serialization.load_pem_private_key(data, password=None)
        elif _HEX.match(data.decode("ascii", "replace")):
            loaded = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data.decode("ascii")))
        elif len(data) == 32:
            loaded = Ed25519PrivateKey.from_private_bytes(data)
        else:
            raise ValueError(f"not PEM, nor 64 hex characters ({len(data)} bytes)")
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{where}: not an Ed25519 private key in PEM or hex ({exc})") from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise SigningKeyError(f"{where}: a {type(loaded).__name__}, not an Ed25519 private key")
    return loaded


def load_public_key(key: KeyInput) -> Ed25519PublicKey:
    """An Ed25519 public key from a key object (a private key gives its public half), PEM, an OpenSSH
    ``ssh-ed25519`` line, 64 hex characters (the raw 32 bytes), or the path of a file holding one."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    data, where = _key_text(key, "public key")
    try:
        if data.startswith(b"-----BEGIN") and b"PRIVATE KEY" in data.split(b"\n", 1)[0]:
            raise ValueError("this is a private key: give the public key (keygen wrote it beside, as .pub)")
        if data.startswith(b"-----BEGIN"):
            loaded = serialization.load_pem_public_key(data)
        elif data.startswith(b"ssh-ed25519 "):
            loaded = serialization.load_ssh_public_key(data)
        elif _HEX.match(data.decode("ascii", "replace")):
            loaded = Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode("ascii")))
        elif len(data) == 32:
            loaded = Ed25519PublicKey.from_public_bytes(data)
        else:
            raise ValueError(f"not {_FORMATS} ({len(data)} bytes)")
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{where}: not an Ed25519 public key ({exc})") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise SigningKeyError(f"{where}: a {type(loaded).__name__}, not an Ed25519 public key")
    return loaded


def generate_keypair(private_path: Path, public_path: Path | None = None) -> tuple[Path, Path, str]:
    """Write a new private key (PEM, PKCS#8, unencrypted, mode 0600) and its public key (PEM, at
    ``public_path``, default PRIVATE.pub); refuse to overwrite either. Returns both paths and the key id."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists():
            raise SigningKeyError(f"{p} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = key.public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    public_path.write_bytes(pub.public_bytes(serialization.Encoding.PEM, spki))
    return private_path, public_path, key_id(pub)


def _message(digest: str, signed_utc: str) -> bytes:
    return MESSAGE_PREFIX + digest.encode("ascii") + b"\n" + signed_utc.encode("ascii")


@attrs.frozen(kw_only=True)
class Signature:
    """One signature entry of ``signatures.json``."""

    key_id: str
    public_key: str  # hex of the raw 32 bytes
    manifest_sha256: str
    signed_utc: str
    signature: str  # hex

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": "ed25519", **attrs.asdict(self)}


def read_signatures(root: Path) -> list[Signature]:
    """The signatures stored beside a bundle's manifest ([] when there are none)."""
    path = Path(root) / SIGNATURES
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries = raw["signatures"] if isinstance(raw, dict) else None
        if raw.get("format") != SIGNATURE_FORMAT or not isinstance(entries, list):
            raise ValueError(f"format {raw.get('format')!r}, expected {SIGNATURE_FORMAT!r} with a 'signatures' list")
        out = []
        for e in entries:
            if e.get("algorithm") != "ed25519":
                raise ValueError(f"algorithm {e.get('algorithm')!r}, only ed25519 is read")
            out.append(Signature(**{f.name: str(e[f.name]) for f in attrs.fields(Signature)}))
        return out
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleSignatureError(f"{path}: unreadable signatures file ({exc})") from None


def sign_bundle(root: Path, key: KeyInput, digest: str) -> Signature:
    """Sign the manifest digest ``digest`` of the bundle at ``root`` with ``key`` and store it in
    ``signatures.json`` (replacing an earlier signature by the same key; other keys' are kept).
    Callers check the bundle first (``clue2geo bundle sign`` opens it with every file verified)."""
    private = load_private_key(key)
    pub = private.public_key()
    signed_utc = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    sig = Signature(
        key_id=key_id(pub),
        public_key=public_bytes(pub).hex(),
        manifest_sha256=digest,
        signed_utc=signed_utc,
        signature=private.sign(_message(digest, signed_utc)).hex(),
    )
    kept = [s for s in read_signatures(root) if s.key_id != sig.key_id]
    doc = {"format": SIGNATURE_FORMAT, "signatures": [s.to_dict() for s in [*kept, sig]]}
    atomic_write(Path(root) / SIGNATURES, json.dumps(doc, indent=2) + "\n")
    return sig


def trusted_by_id(trusted_keys: Iterable[KeyInput]) -> dict[str, Ed25519PublicKey]:
    """The trusted public keys, by key id."""
    return {key_id(k): k for k in map(load_public_key, trusted_keys)}


def split_by_trust(
    sigs: Iterable[S], trusted: dict[str, Ed25519PublicKey], fault: Callable[[S, Ed25519PublicKey], str | None]
) -> tuple[list[S], list[str]]:
    """The signatures by trusted keys that hold, and why the others by trusted keys do not
    (``fault`` says, for a signature and its trusted key; None when it holds)."""
    good, faults = [], []
    for sig in sigs:
        key = trusted.get(sig.key_id)  # type: ignore[attr-defined]
        if key is None:
            continue
        why = fault(sig, key)
        if why is None:
            good.append(sig)
        else:
            faults.append(why)
    return good, faults


def check_signatures(root: Path, digest: str, trusted_keys: Iterable[KeyInput], *, name: str) -> list[str]:
    """The ids of the trusted keys whose signature in ``signatures.json`` verifies over ``digest``;
    raise :class:`BundleSignatureError` when there is none (unsigned, signed by other keys only, or a
    signature that does not match: the manifest changed after signing)."""
    trusted = trusted_by_id(trusted_keys)
    if not trusted:
        raise BundleSignatureError(f"bundle {name!r}: trusted_keys is empty; give at least one public key")
    sigs = read_signatures(root)
    if not sigs:
        raise BundleSignatureError(
            f"bundle {name!r} is not signed (no {SIGNATURES} beside its manifest) and trusted keys were given "
            f"({', '.join(trusted)}); refused. Sign it with 'clue2geo bundle sign {root} --key PRIVATE_KEY'"
        )

    def fault(sig: Signature, pub: Ed25519PublicKey) -> str | None:
        if public_bytes(pub).hex() != sig.public_key:
            return f"key {sig.key_id}: the stored public key is not the trusted one"
        try:
            pub.verify(bytes.fromhex(sig.signature), _message(digest, sig.signed_utc))
        except (InvalidSignature, ValueError):
            if sig.manifest_sha256 != digest:
                return (
                    f"key {sig.key_id} signed manifest sha256 {sig.manifest_sha256} on {sig.signed_utc}, "
                    f"but the manifest is now {digest}: it changed after signing"
                )
            return f"key {sig.key_id}: the signature does not verify (the signatures file was edited)"
        return None

    good, faults = split_by_trust(sigs, trusted, fault)
    if good:
        return [sig.key_id for sig in good]
    if not faults:
        others = ", ".join(s.key_id for s in sigs)
        raise BundleSignatureError(
            f"bundle {name!r} is signed only by key(s) {others}, none of them trusted ({', '.join(trusted)}); refused"
        )
    raise BundleSignatureError(f"bundle {name!r}: bad signature, refused: {'; '.join(faults)}")


__all__ = [
    "SIGNATURES",
    "BundleSignatureError",
    "Signature",
    "SigningKeyError",
    "check_signatures",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "read_signatures",
    "sign_bundle",
    "split_by_trust",
    "trusted_by_id",
]
