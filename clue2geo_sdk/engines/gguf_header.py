"""A tiny reader of a GGUF file's header key/values, for sizing a load before llama.cpp makes it.

The memory check needs the text model's layer count, KV heads and head size to count the KV cache;
loading the model through llama.cpp to ask it would cost the very memory being checked. Only the
header is read (scalars decoded, arrays skipped unless asked for), and reading stops as soon as every
wanted key has been seen. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from ..errors import Clue2GeoError

MAGIC = b"GGUF"
# value type -> struct format of a scalar (8: string, 9: array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_KEY_BYTES = 1 << 16  # far above any real key; a larger length means a corrupt header
MAX_STRING_BYTES = 1 << 26
MAX_COUNT = 1 << 24  # keys or tensors: real files hold thousands


class GGUFHeaderError(Clue2GeoError, ValueError):
    """A GGUF file whose header cannot be read (not GGUF, truncated, or missing a needed key)."""


def _read(fh: BinaryIO, n: int, path: Path) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise GGUFHeaderError(f"GGUF file {path}: header is truncated")
    return data


def _scalar(fh: BinaryIO, fmt: str, path: Path) -> Any:
    return struct.unpack(fmt, _read(fh, struct.calcsize(fmt), path))[0]


def _string(fh: BinaryIO, path: Path, limit: int = MAX_STRING_BYTES) -> bytes:
    n = _scalar(fh, "<Q", path)
    if n > limit:
        raise GGUFHeaderError(f"GGUF file {path}: a header string claims {n} bytes; the file is corrupt")
    return _read(fh, n, path)


def _value(fh: BinaryIO, vtype: int, path: Path, *, keep: bool) -> Any:
    """One value of ``vtype``; arrays are returned only when ``keep`` (else skipped, None)."""
    if vtype in _SCALARS:
        return _scalar(fh, _SCALARS[vtype], path)
    if vtype == _STRING:
        return _string(fh, path).decode("utf-8", "replace")
    if vtype == _ARRAY:
        itype, count = _scalar(fh, "<I", path), _scalar(fh, "<Q", path)
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype])
            if keep:
                return list(struct.unpack(f"<{count}{_SCALARS[itype][1]}", _read(fh, size * count, path)))
            fh.seek(size * count, 1)
            return None
        items = [_value(fh, itype, path, keep=keep) for _ in range(count)]
        return items if keep else None
    raise GGUFHeaderError(f"GGUF file {path}: unknown value type {vtype} in the header; the file is corrupt")


def _kv_section(fh: BinaryIO, p: Path) -> tuple[int, int]:
    """Check the magic and version; return (tensor count, key/value count), positioned at the first key."""
    if _read(fh, 4, p) != MAGIC:
        raise GGUFHeaderError(f"{p} is not a GGUF file (no GGUF magic at its start)")
    version = _scalar(fh, "<I", p)
    if version < 2:  # GGUF v1 counted in 32 bits; no current llama.cpp reads it
        raise GGUFHeaderError(f"{p} is GGUF version {version}, which llama.cpp no longer reads")
    n_tensors, n_kv = _scalar(fh, "<Q", p), _scalar(fh, "<Q", p)
    if n_tensors > MAX_COUNT or n_kv > MAX_COUNT:
        raise GGUFHeaderError(f"{p}: header claims {n_tensors} tensors and {n_kv} keys; the file is corrupt")
    return n_tensors, n_kv


def read_header(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The header's key/values (all, or only ``keys``, stopping once each was seen). Array values
    are kept only for wanted keys (a tokenizer's 150k-entry vocabulary is skipped, not decoded)."""
    p = Path(path)
    wanted = set(keys) if keys is not None else None
    out: dict[str, Any] = {}
    try:
        with open(p, "rb") as fh:
            _n_tensors, n_kv = _kv_section(fh, p)
            for _ in range(n_kv):
                key = _string(fh, p, MAX_KEY_BYTES).decode("utf-8", "replace")
                vtype = _scalar(fh, "<I", p)
                keep = wanted is None or key in wanted
                value = _value(fh, vtype, p, keep=keep)
                if keep:
                    out[key] = value
                    if wanted is not None and wanted <= out.keys():
                        break
    except OSError as exc:
        raise GGUFHeaderError(f"GGUF file {p} cannot be read ({exc.strerror or exc})") from None
    return out


def tensor_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of each tensor's data, from the tensor table's offsets (what llama.cpp loads or maps for
    it, alignment padding included), without knowing any quantisation's block size."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            n_tensors, n_kv = _kv_section(fh, p)
            alignment = 32
            for _ in range(n_kv):
                key = _string(fh, p, MAX_KEY_BYTES).decode("utf-8", "replace")
                vtype = _scalar(fh, "<I", p)
                value = _value(fh, vtype, p, keep=False)
                if key == "general.alignment" and isinstance(value, int) and value > 0:
                    alignment = value
            offsets: list[tuple[int, str]] = []
            for _ in range(n_tensors):
                name = _string(fh, p, MAX_KEY_BYTES).decode("utf-8", "replace")
                n_dims = _scalar(fh, "<I", p)
                if n_dims > 8:
                    raise GGUFHeaderError(f"GGUF file {p}: tensor {name!r} claims {n_dims} dimensions; corrupt")
                fh.seek(8 * n_dims + 4, 1)  # dims, then the ggml type
                offsets.append((_scalar(fh, "<Q", p), name))
            data_start = -(-fh.tell() // alignment) * alignment
            size = p.stat().st_size
    except OSError as exc:
        raise GGUFHeaderError(f"GGUF file {p} cannot be read ({exc.strerror or exc})") from None
    offsets.sort()
    ends = [o for o, _ in offsets[1:]] + [size - data_start]
    out = {name: end - off for (off, name), end in zip(offsets, ends, strict=True)}
    if any(n < 0 for n in out.values()):
        raise GGUFHeaderError(f"GGUF file {p}: tensor offsets run past the end of the file; it is truncated")
    return out


@attrs.frozen(kw_only=True)
class TextModelShape:
    """What sizes the KV cache of a decoder-only GGUF model (llama.cpp's hparams of the same names)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]  # per layer (GGUF may give one number or one per layer)
    head_dim_k: int
    head_dim_v: int
    n_vocab: int

    def kv_bytes_per_cell(self, bytes_per_element: int = 2) -> int:
        """K and V of one KV cell over every layer (llama.cpp's default cache type is f16: 2 bytes)."""
        return sum(h * (self.head_dim_k + self.head_dim_v) for h in self.n_head_kv) * bytes_per_element


def text_model_shape(path: str | Path) -> TextModelShape:
    """The layer count, head counts and head sizes of a GGUF text model, from its header only."""
    p = Path(path)
    arch = read_header(p, ["general.architecture"]).get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFHeaderError(f"GGUF file {p} names no general.architecture")
    names = {
        "n_layer": f"{arch}.block_count",
        "n_embd": f"{arch}.embedding_length",
        "n_head": f"{arch}.attention.head_count",
        "n_head_kv": f"{arch}.attention.head_count_kv",
        "k": f"{arch}.attention.key_length",
        "v": f"{arch}.attention.value_length",
        "vocab": f"{arch}.vocab_size",
        "tokens": "tokenizer.ggml.tokens",
    }
    found = read_header(p, [v for k, v in names.items() if k != "tokens"])
    missing = [names[k] for k in ("n_layer", "n_embd", "n_head") if not isinstance(found.get(names[k]), int)]
    if missing:
        raise GGUFHeaderError(f"GGUF file {p} lacks {', '.join(missing)}; cannot size its KV cache")
    n_layer, n_embd = int(found[names["n_layer"]]), int(found[names["n_embd"]])
    head = found[names["n_head"]]
    kv = found.get(names["n_head_kv"], head)  # absent: no grouped-query attention (llama.cpp's default)
    per_layer = tuple(int(h) for h in kv) if isinstance(kv, list) else (int(kv),) * n_layer
    if len(per_layer) != n_layer or n_layer <= 0 or head <= 0:
        raise GGUFHeaderError(f"GGUF file {p}: inconsistent layer/head counts in its header")
    head_dim = n_embd // int(head)
    vocab = found.get(names["vocab"])
    if not isinstance(vocab, int):  # most GGUFs give the vocabulary only as the token list
        vocab = _token_count(p)
    return TextModelShape(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=int(head),
        n_head_kv=per_layer,
        head_dim_k=int(found.get(names["k"], head_dim)),
        head_dim_v=int(found.get(names["v"], head_dim)),
        n_vocab=int(vocab),
    )


def _token_count(path: Path) -> int:
    """The length of ``tokenizer.ggml.tokens`` without decoding it (its count precedes its items)."""
    with open(path, "rb") as fh:
        _n_tensors, n_kv = _kv_section(fh, path)
        for _ in range(n_kv):
            key = _string(fh, path, MAX_KEY_BYTES).decode("utf-8", "replace")
            vtype = _scalar(fh, "<I", path)
            if key == "tokenizer.ggml.tokens" and vtype == _ARRAY:
                _scalar(fh, "<I", path)
                return int(_scalar(fh, "<Q", path))
            _value(fh, vtype, path, keep=False)
    return 0
