"""Qwen2.5-VL Hugging Face folder -> text GGUF + mmproj GGUF, quantized, loaded back and asked once.

Conversion runs llama.cpp's own ``convert_hf_to_gguf.py``, taken from the llama-cpp-python sdist
that matches the installed version (so the GGUF is one the installed runtime reads), or from a
llama.cpp checkout the caller names.
"""

from __future__ import annotations

import base64
import ctypes
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from clue2geo_sdk.errors import ExportValidationError, MissingExtraError
from clue2geo_sdk.vlm import silence_native_logs

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


def _run_converter(src: Path, hf_dir: Path, out: Path, *, mmproj: bool) -> Path:
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out), "--outtype", "f16"]
    if mmproj:
        cmd.append("--mmproj")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 or not out.is_file():
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"llama.cpp's convert_hf_to_gguf.py failed on {hf_dir} (mmproj={mmproj}):\n{tail}")
    return out


QUANT_TYPES = {
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
}


def quantize(src: Path, dst: Path, quant: str) -> Path:
    """Quantize a GGUF with llama.cpp (the library llama-cpp-python ships)."""
    import llama_cpp

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


def check_gguf_pair(model: Path, mmproj: Path) -> dict[str, Any]:
    """Load the pair in llama-cpp-python and answer one image prompt under a JSON schema."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Qwen25VLChatHandler
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (112, 84), (90, 140, 200)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    silence_native_logs()
    handler = Qwen25VLChatHandler(clip_model_path=str(mmproj), verbose=False)
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
            max_tokens=48,
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
) -> dict[str, Any]:
    """Convert, quantize and check; return the file paths and what the check saw."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = llama_cpp_source(llama_cpp_dir)
    f16 = _run_converter(src, hf_dir, out_dir / "model-f16.gguf", mmproj=False)
    mmproj = _run_converter(src, hf_dir, out_dir / "mmproj-f16.gguf", mmproj=True)
    model = quantize(f16, out_dir / f"model-{quant.lower()}.gguf", quant)
    f16.unlink()
    check = check_gguf_pair(model, mmproj)
    return {"model": model, "mmproj": mmproj, "quant": quant, "check": check, "converter": str(src)}
