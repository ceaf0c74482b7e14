"""Qwen2.5-VL Hugging Face folder -> text GGUF + mmproj GGUF, quantized, loaded back and asked once.

Conversion runs llama.cpp's own ``convert_hf_to_gguf.py``, taken from the llama-cpp-python sdist
that matches the installed version (so the GGUF is one the installed runtime reads), or from a
llama.cpp checkout the caller names.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import importlib.util
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from clue2geo_sdk._native import llama_cpp_module
from clue2geo_sdk.engines.base import portable_model_defaults, silence_native_logs
from clue2geo_sdk.errors import ExportValidationError, MissingExtraError

CACHE = Path(os.environ.get("CLUE2GEO_CACHE", Path.home() / ".cache" / "clue2geo"))
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_source(llama_cpp_dir: str | Path | None = None) -> Path:
    """A folder holding ``convert_hf_to_gguf.py`` and ``gguf-py``: the caller's checkout or the cached sdist."""
    if llama_cpp_dir is not None:
        root = Path(llama_cpp_dir)
        if not (root / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"{root} has no convert_hf_to_gguf.py; pass the root of a llama.cpp checkout")
        return root
    ver = version("llama-cpp-python")
    root = CACHE / f"llama.cpp-{ver}"
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"llama_cpp_python-{ver}.tar.gz"
    if not sdist.is_file():
        # pip prepares the sdist's metadata with its build backend, taken from this environment
        # (--no-build-isolation: nothing fetched beyond the sdist itself); the [export] extra brings it.
        if importlib.util.find_spec("scikit_build_core") is None:
            raise MissingExtraError("scikit_build_core", "export", "fetching llama.cpp's converter (pip download)")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--no-build-isolation",
            f"llama-cpp-python=={ver}",
            "-d",
            str(CACHE),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not sdist.is_file():
            raise RuntimeError(
                f"could not fetch the llama-cpp-python {ver} sdist for llama.cpp's converter "
                f"(pip said: {res.stderr.strip()[-400:]}); pass llama_cpp_dir= a llama.cpp checkout instead"
            )
    prefix = f"llama_cpp_python-{ver}/vendor/llama.cpp/"
    tmp = root.with_suffix(".tmp")
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(_CONVERTER_PARTS):
                m.name = m.name[len(prefix) :]
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(root)
    return root


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child process; return its exit code, output tail, wall seconds and peak RSS (MB)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        log.seek(0)
        tail = log.read()[-8000:].decode("utf-8", "replace")
    return {"rc": proc.returncode, "tail": tail, "seconds": round(seconds, 2), "peak_rss_mb": usage.ru_maxrss // 1024}


def _run_converter(src: Path, hf_dir: Path, out: Path, *, mmproj: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out), "--outtype", "f16"]
    if mmproj:
        cmd.append("--mmproj")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    res = run_measured(cmd, env)
    if res["rc"] != 0 or not out.is_file():
        tail = "\n".join(res["tail"].strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {hf_dir} (mmproj={mmproj}):\n{tail}")
    return {"seconds": res["seconds"], "peak_rss_mb": res["peak_rss_mb"], "bytes": out.stat().st_size}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets): no tensor is read."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100_000_000:
            raise ExportValidationError(f"{path}: not a safetensors file (header of {n} bytes)")
        return dict(json.loads(fh.read(n)))


def checkpoint_layout(hf_dir: str | Path) -> dict[str, Any]:
    """Check, from the safetensors headers alone, that llama.cpp's converter will read every weight.

    Accepted: the published Hugging Face layout (``model.layers.*``, ``model.embed_tokens``,
    ``lm_head``, ``visual.*``; one file or shards with ``model.safetensors.index.json``), which is also
    what transformers 4.57's ``save_pretrained`` writes for a merged fine-tune, in any float dtype.
    Refused with the reason: unmerged LoRA adapters, and vision weights under transformers'
    in-memory names (``model.visual.*``), which the converter would silently leave out of the mmproj.
    """
    hf_dir = Path(hf_dir)
    parts = sorted(hf_dir.glob("*.safetensors"))
    if not parts:
        found = ", ".join(sorted(p.name for p in hf_dir.iterdir())[:8]) if hf_dir.is_dir() else "no such folder"
        raise ExportValidationError(
            f"{hf_dir}: no *.safetensors weights (found: {found}); save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )
    names: dict[str, str] = {}
    dtypes: dict[str, int] = {}
    for part in parts:
        for name, meta in safetensors_header(part).items():
            if name == "__metadata__":
                continue
            names[name] = part.name
            dtypes[meta["dtype"]] = dtypes.get(meta["dtype"], 0) + 1
    lora = [n for n in names if ".lora_" in n or n.startswith("base_model.model.")]
    if lora:
        raise ExportValidationError(
            f"{hf_dir}: holds unmerged LoRA adapter weights (e.g. {lora[0]!r}); merge them first "
            "(peft: model.merge_and_unload(), then save_pretrained) so the weights carry the base model's names"
        )
    inner = [n for n in names if n.startswith(("model.visual.", "model.language_model."))]
    if inner:
        raise ExportValidationError(
            f"{hf_dir}: weights are saved under transformers' in-memory names (e.g. {inner[0]!r}), not the "
            "published checkpoint names (visual.*, model.layers.*); llama.cpp's converter would leave the "
            "vision tower out of the mmproj. Save with transformers 4.57 (the pinned version), whose "
            "save_pretrained writes the published names"
        )
    if not any(n.startswith("visual.") for n in names):
        raise ExportValidationError(f"{hf_dir}: no vision tower weights (visual.*): not a Qwen2.5-VL checkpoint")
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
        if set(weight_map) != set(names) or any(names[k] != v for k, v in weight_map.items()):
            missing = sorted(set(weight_map) - set(names))[:3]
            raise ExportValidationError(
                f"{hf_dir}: model.safetensors.index.json does not match the shards (e.g. missing {missing})"
            )
    return {"tensors": len(names), "files": len(parts), "dtypes": dtypes, "layout": "published"}


def gguf_module(src: Path | None = None) -> Any:
    """llama.cpp's ``gguf`` Python package from the converter's source folder."""
    src = src or llama_cpp_source()
    path = str(src / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf  # from the converter's source folder, on sys.path only from the line above

    return gguf


def gguf_contents(path: Path, src: Path | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """One parse of a GGUF file: every tensor (type, shape, sha256 of its bytes, read memory-mapped)
    and the key/value metadata as Python values (arrays as lists)."""
    reader = gguf_module(src).GGUFReader(str(path))
    tensors = {
        t.name: {
            "type": t.tensor_type.name,
            "shape": [int(x) for x in t.shape],
            "sha256": hashlib.sha256(memoryview(np.ascontiguousarray(t.data)).cast("B")).hexdigest(),
        }
        for t in reader.tensors
    }
    fields: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            fields[name] = field.contents()
        except Exception:  # an unusual type: keep its raw parts' digest so it still compares
            fields[name] = hashlib.sha256(b"".join(bytes(p) for p in field.parts)).hexdigest()
    return tensors, fields


def _block_count(path: Path, prefix: str, src: Path) -> int:
    reader = gguf_module(src).GGUFReader(str(path))
    at = 2 if prefix == "v." else 1
    blocks = {t.name.split(".")[at] for t in reader.tensors if t.name.startswith(prefix + "blk.")}
    return len(blocks)


QUANT_TYPES = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


def quantize(src: Path, dst: Path, quant: str) -> Path:
    """Quantize a GGUF with llama.cpp (the library llama-cpp-python ships)."""
    llama_cpp = llama_cpp_module()

    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown quant {quant!r}; choose one of {', '.join(QUANT_TYPES)}")
    silence_native_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp failed to quantize {src} to {quant} (code {rc})")
    return dst


CHECK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"country": {"type": "string", "maxLength": 16}},
    "required": ["country"],
}


def check_gguf_pair(model: Path, mmproj: Path, *, max_tokens: int = 48) -> dict[str, Any]:
    """Load the pair in llama-cpp-python and answer one image prompt under a JSON schema."""
    llama_cpp_module()  # the safe first import (clue2geo_sdk._native)
    from llama_cpp import Llama  # native: after llama_cpp_module() (clue2geo_sdk._native)
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler  # with the line above

    buf = io.BytesIO()
    Image.new("RGB", (112, 84), (90, 140, 200)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    silence_native_logs()
    handler = Qwen25VLChatHandler(clip_model_path=str(mmproj), verbose=False)
    with portable_model_defaults():
        llm = Llama(str(model), chat_handler=handler, n_ctx=1024, seed=0, verbose=False)
    try:
        out = llm.create_chat_completion(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "Which country is this?"},
                    ],
                }
            ],
            response_format={"type": "json_object", "schema": CHECK_SCHEMA},
            max_tokens=max_tokens,
            temperature=0.0,
        )
    finally:
        llm.close()
    text = out["choices"][0]["message"]["content"]
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportValidationError(
            f"{model}: the image prompt's answer is not JSON under the schema: {text!r}"
        ) from exc
    if not isinstance(answer.get("country"), str):
        raise ExportValidationError(f"{model}: the answer lacks the schema's 'country' string: {text!r}")
    return {"prompt_tokens": out["usage"]["prompt_tokens"], "answer": answer}


def export_vlm(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    quant: str = "Q4_K_M",
    llama_cpp_dir: str | Path | None = None,
    check_max_tokens: int = 48,
) -> dict[str, Any]:
    """Convert, quantize and check; return the file paths, what the check saw, and what each step cost.

    The converter maps the checkpoint lazily (one tensor in memory at a time), so a 7B model converts
    in a few GB of RAM; its peak RSS is measured and returned (``steps``)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layout = checkpoint_layout(hf_dir)
    src = llama_cpp_source(llama_cpp_dir)
    f16 = out_dir / "model-f16.gguf"
    mmproj = out_dir / "mmproj-f16.gguf"
    steps: dict[str, Any] = {}
    steps["convert_text"] = _run_converter(src, hf_dir, f16, mmproj=False)
    steps["convert_mmproj"] = _run_converter(src, hf_dir, mmproj, mmproj=True)
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    text_cfg = cfg.get("text_config") or cfg
    want_text = int(text_cfg.get("num_hidden_layers") or cfg["num_hidden_layers"])
    want_vision = int(cfg["vision_config"]["depth"])
    got_text, got_vision = _block_count(f16, "", src), _block_count(mmproj, "v.", src)
    if (got_text, got_vision) != (want_text, want_vision):
        raise ExportValidationError(
            f"{hf_dir}: the GGUF pair has {got_text} text and {got_vision} vision blocks; config.json "
            f"says {want_text} and {want_vision}"
        )
    t0 = time.perf_counter()
    model = quantize(f16, out_dir / f"model-{quant.lower()}.gguf", quant)
    steps["quantize"] = {"seconds": round(time.perf_counter() - t0, 2), "bytes": model.stat().st_size}
    f16.unlink()
    t0 = time.perf_counter()
    check = check_gguf_pair(model, mmproj, max_tokens=check_max_tokens)
    steps["check"] = {"seconds": round(time.perf_counter() - t0, 2)}
    return {
        "model": model,
        "mmproj": mmproj,
        "quant": quant,
        "check": check,
        "converter": str(src),
        "layout": layout,
        "steps": steps,
    }
