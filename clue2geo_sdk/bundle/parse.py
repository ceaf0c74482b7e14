"""A manifest's bytes -> checked components: what the runtime reads is type- and range-checked once.

Every parameter a ``locate`` reads is declared here per role (``_PARAMS``) with its type and range, so a
hand-edited manifest is refused at open in one line that names component, field, value and what was
expected, instead of crashing a later ``locate``. Unknown fields are kept as they are.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import BundleFormatError, BundleNotFoundError
from .components import ATTACHED_ROLES, ROLES, Component, ComponentFile

MAX_MANIFEST_BYTES = 64 << 20  # real manifests are tens of KB; this only stops an endless read

_MISSING = object()

_Check = Callable[[Any], str | None]  # None when the value is fine, else what was expected
_HEX64 = re.compile(r"[0-9a-f]{64}")


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
    "validation": ("report",),  # validation.json; its page and others may follow
    "selftest": ("answers",),  # the expected records; the photos follow as photo-N
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
    "validation": {"models_digest": (True, _hex64)},
    "selftest": {"models_digest": (True, _hex64)},
}


def shown(value: Any) -> str:
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
            raise BundleFormatError(f"{where}, params.{field} is {shown(node)}: expected {expected}")
    vlm_ctx, vlm_img = params.get("n_ctx"), params.get("image_max_tokens")
    if role == "vlm" and _is_int(vlm_ctx) and _is_int(vlm_img) and vlm_img >= vlm_ctx:
        raise BundleFormatError(
            f"{where}, params.image_max_tokens is {vlm_img} but params.n_ctx is {vlm_ctx}: "
            "expected n_ctx above image_max_tokens (the image alone takes that many context cells)"
        )


def parse_files(raw: Any, role: str, where: str) -> dict[str, ComponentFile]:
    """A component's ``files`` object, each entry checked (path, sha256, size); ``where`` starts messages."""
    if not isinstance(raw, dict) or not raw:
        raise BundleFormatError(f"{where}: component {role!r}, 'files' must be a non-empty object")
    files: dict[str, ComponentFile] = {}
    for key, f in raw.items():
        bad = None
        if not isinstance(f, dict):
            bad = f"is {shown(f)}: expected an object with 'path', 'sha256' and 'bytes'"
        elif not isinstance(f.get("path"), str) or not f["path"]:
            bad = f"path is {shown(f.get('path'))}: expected a relative path (a non-empty string)"
        elif _hex64(f.get("sha256")) is not None:
            bad = f"sha256 is {shown(f.get('sha256'))}: expected {_hex64(None)}"
        elif not _is_int(f.get("bytes")) or f["bytes"] < 0:
            bad = f"bytes is {shown(f.get('bytes'))}: expected a file size (an integer, 0 or more)"
        if bad:
            raise BundleFormatError(f"{where}: component {role!r}, file {key!r} {bad}")
        files[key] = ComponentFile(path=f["path"], sha256=f["sha256"], bytes=f["bytes"])
    return files


def _parse_component(raw: Any, where: str) -> Component:
    if not isinstance(raw, dict):
        raise BundleFormatError(f"{where}: a component must be a JSON object, got {shown(raw)}")
    role = raw.get("role")
    if role not in ROLES + ATTACHED_ROLES:
        known = ", ".join(ROLES + ATTACHED_ROLES)
        raise BundleFormatError(f"{where}: unknown role {role!r}; known roles are {known}")
    files = parse_files(raw.get("files"), role, where)
    missing = [k for k in _FILES[role] if k not in files]
    if missing:
        raise BundleFormatError(
            f"{where}: component {role!r} has no file {missing[0]!r}: expected files {', '.join(_FILES[role])}"
        )
    for field, default in (("params", {}), ("provenance", {})):
        value = raw.get(field, default)
        if not isinstance(value, dict):
            raise BundleFormatError(f"{where}: component {role!r}, {field} is {shown(value)}: expected a JSON object")
    if not isinstance(raw.get("random_weights", False), bool):
        raise BundleFormatError(
            f"{where}: component {role!r}, random_weights is {shown(raw['random_weights'])}: expected true or false"
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


def parse_components(comps_raw: Any, manifest: Path) -> dict[str, Component]:
    """The manifest's ``components`` list, by role: each component checked, every role once, and the
    gallery's dim that of the GPSCLIP embeddings it holds."""
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
    g_dim, l_dim = components["gallery"].params["dim"], components["gpsclip"].params["dim"]
    if g_dim != l_dim:  # the gallery holds GPSCLIP location embeddings, queried with its image embeddings
        raise BundleFormatError(
            f"{manifest}: component 'gallery', params.dim is {g_dim}: expected {l_dim}, the dim of component "
            "'gpsclip' whose embeddings it holds"
        )
    return components


def read_manifest_bytes(manifest: Path) -> bytes:
    """The manifest's bytes, read once; anything but a regular file is refused before reading (a FIFO
    named manifest.json would block the open for ever)."""
    root = manifest.parent
    try:
        fd = os.open(manifest, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise BundleNotFoundError(f"{str(root)!r} has no {manifest.name}; is it a clue2geo bundle?") from None
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


def load_manifest(data: bytes, manifest: Path) -> dict[str, Any]:
    """The manifest's JSON object; invalid JSON, or JSON that is not an object, is refused."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleFormatError(f"{manifest}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleFormatError(f"{manifest}: not a bundle manifest (JSON nested too deeply)") from None
    if not isinstance(raw, dict):
        raise BundleFormatError(f"{manifest}: top level must be a JSON object")
    return raw


def check_header(raw: Mapping[str, Any], manifest: Path) -> None:
    """Refuse a name, creation time or demo flag of the wrong type."""
    for key, kind, check in (("name", "a string", str), ("created", "a string", str), ("demo", "true/false", bool)):
        if key in raw and not isinstance(raw[key], check):
            raise BundleFormatError(f"{manifest}: {key} is {shown(raw[key])}: expected {kind}")


def escapes(root: Path, rel: str) -> bool:
    """Whether a component path is absolute or leads out of the (resolved) bundle folder ``root``."""
    return Path(rel).is_absolute() or not (root / rel).resolve().is_relative_to(root)


def check_paths(components: Mapping[str, Component], root: Path, manifest: Path) -> None:
    """Refuse a component file whose path leaves the (resolved) bundle folder ``root``."""
    for comp in components.values():
        for key, f in comp.files.items():
            if escapes(root, f.path):
                raise BundleFormatError(
                    f"{manifest}: role {comp.role}, file {key!r}: path {f.path!r} escapes the bundle "
                    "directory; component paths must be relative and stay inside it"
                )
