"""``clue2geo doctor``: what a support request needs, and whether this configuration is known-good.

CPU features (AMX and AVX-512 change which llama.cpp kernels run), llama.cpp's build and system
info, the setting that keeps AMX kernels off, ONNX Runtime's providers, free memory, and with
``--bundle`` what the bundle needs. Read-only: nothing is loaded but the native libraries.
"""

from __future__ import annotations

import json
import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import click

from .._native import onnxruntime_module
from .._version import __version__
from ..bundle.manifest import Bundle
from ..engines import base as engines_base
from ..engines.base import load_llama_cpp, use_extra_bufts
from ..engines.memory import available_memory, memory_need
from ..engines.threads import default_threads

# CPU flags that decide which ggml kernels a native build compiles and runs.
CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
KNOWN_GOOD_LLAMA = "0.3.36"  # the llama-cpp-python this release is tested with (constraints.txt)


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name, logical CPUs and which of :data:`CPU_FLAGS` it reports (Linux): the
    flags as the engines read them (:func:`~clue2geo_sdk.engines.base.cpu_flags`) unless ``cpuinfo``
    text is given."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
        flags = engines_base.cpu_flags()
    else:
        flags = engines_base.cpu_flags(cpuinfo)
    model = next(
        (v.strip() for k, _, v in (ln.partition(":") for ln in cpuinfo.splitlines()) if k.strip() == "model name"),
        None,
    )
    return {
        "model": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "default_threads": default_threads(),  # llama.cpp's: the physical cores this process may use
        "flags": [f for f in CPU_FLAGS if f in flags],
        "amx": engines_base.amx_possible("", flags),
    }


def llama_info() -> dict[str, Any]:
    """llama-cpp-python's version, llama.cpp's system info (the kernels compiled in) and GPU offload."""
    lib, _ = load_llama_cpp(verbose=False)
    system = lib.llama_print_system_info().decode(errors="replace").strip()
    compiled = sorted({m.group(1) for m in re.finditer(r"([A-Z0-9_]+) = 1", system)})
    return {
        "llama_cpp_python": _version_of("llama_cpp_python"),
        "system_info": system,
        "compiled_features": compiled,
        "amx_kernels_built": any(f.startswith("AMX") for f in compiled),
        "gpu_offload": bool(lib.llama_supports_gpu_offload()),
        "amx_possible": engines_base.amx_possible(system, engines_base.cpu_flags()),
        "extra_buffer_types": "on (no AMX in this CPU or build: the repack kernels run)"
        if use_extra_bufts()
        else "off on every model load (AMX kernels never run)",
    }


def onnx_info() -> dict[str, Any]:
    ort = onnxruntime_module()
    return {"onnxruntime": ort.__version__, "providers": list(ort.get_available_providers())}


def memory_info() -> dict[str, Any]:
    total = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    return {"total_bytes": total, "available_bytes": available_memory()}


def bundle_info(path: Path, max_in_flight: int) -> dict[str, Any]:
    """The bundle's identity, size on disk and the host memory a load would need (the same count
    ``Geolocator.load`` checks; manifest and GGUF headers only, no digest is checked here)."""
    b = Bundle.open(path, verify=False)
    info = b.info()
    need = memory_need(b, max_in_flight=max_in_flight)
    return {
        "path": str(path),
        "name": info.get("name"),
        "demo": info.get("demo"),
        "bytes": info.get("bytes"),
        "memory_need": need.to_dict(),
    }


def diagnose(bundle: Path | None = None, *, max_in_flight: int = 4) -> dict[str, Any]:
    """Everything :func:`doctor_cmd` prints, and ``problems``: empty when the configuration is known-good."""
    report: dict[str, Any] = {
        "clue2geo": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "memory": memory_info(),
    }
    problems: list[str] = []
    for key, probe in (("llama_cpp", llama_info), ("onnxruntime", onnx_info)):
        try:
            report[key] = probe()
        except Exception as exc:  # a broken install is what the user came to diagnose
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
            problems.append(f"{key} cannot be loaded: {exc}")
    llama = report.get("llama_cpp", {})
    if llama.get("llama_cpp_python") not in (None, KNOWN_GOOD_LLAMA):
        problems.append(f"llama-cpp-python {llama['llama_cpp_python']} is not the tested {KNOWN_GOOD_LLAMA}")
    if llama.get("amx_possible") and llama.get("extra_buffer_types", "").startswith("on"):
        problems.append("AMX kernels could run and extra buffer types are on: llama.cpp 0.3.36 crashes there")
    if bundle is not None:
        try:
            report["bundle"] = bundle_info(bundle, max_in_flight)
        except Exception as exc:
            report["bundle"] = {"error": str(exc)}
            problems.append(f"bundle {bundle}: {exc}")
        else:
            avail = report["memory"]["available_bytes"]
            need = report["bundle"]["memory_need"]["total"]
            if avail is not None and need > avail:
                problems.append(
                    f"loading it with {max_in_flight} images in flight needs {_gib(need)}; {_gib(avail)} is free"
                )
    report["problems"] = problems
    report["known_good"] = not problems
    return report


def _version_of(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


@click.command("doctor")
@click.option("--bundle", "bundle_path", type=click.Path(path_type=Path), default=None, help="Also check this bundle.")
@click.option(
    "--max-in-flight", type=click.IntRange(1), default=4, show_default=True, help="Images in flight, for the need."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def doctor_cmd(bundle_path: Path | None, max_in_flight: int, as_json: bool) -> None:
    """Print what a support request needs: CPU features, llama.cpp build, ONNX Runtime, memory."""
    r = diagnose(bundle_path, max_in_flight=max_in_flight)
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        cpu, llama, onnx = r["cpu"], r.get("llama_cpp", {}), r.get("onnxruntime", {})
        lines = [
            f"clue2geo {r['clue2geo']} on Python {r['python']}, {r['platform']}",
            f"CPU: {cpu['model']} ({cpu['logical_cpus']} logical CPUs); flags: {' '.join(cpu['flags']) or 'none'}",
            f"llama-cpp-python: {llama.get('llama_cpp_python', llama.get('error'))}; "
            f"GPU offload: {llama.get('gpu_offload')}; extra buffer types: {llama.get('extra_buffer_types')}",
            f"llama.cpp system info: {llama.get('system_info', '')}",
            f"onnxruntime: {onnx.get('onnxruntime', onnx.get('error'))}; "
            f"providers: {', '.join(onnx.get('providers', []))}",
            f"memory: {_gib(r['memory']['available_bytes'])} free of {_gib(r['memory']['total_bytes'])}",
        ]
        if "bundle" in r:
            b = r["bundle"]
            about = b.get("error") or (
                f"{b['name']!r} at {b['path']}, {_gib(b['bytes'])} on disk, demo={b['demo']}; "
                f"a load needs {_gib(b['memory_need']['total'])} of RAM"
            )
            lines.append(f"bundle: {about}")
        lines += [f"problem: {p}" for p in r["problems"]] or ["configuration: known-good"]
        click.echo("\n".join(lines))
    if r["problems"]:
        raise SystemExit(1)
