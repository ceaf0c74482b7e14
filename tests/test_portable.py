"""Runs on any x86-64 CPU: wherever AMX could run (the CPU reports it, or llama.cpp was built with
AMX kernels), every path that loads a GGUF in this package loads it with llama.cpp's extra buffer
types off, so the AMX kernels that crash a native build on Sapphire Rapids and later are never used.
A host without AMX cannot show the crash, so these tests make the host look like one and assert the
setting itself, at the call into llama.cpp, on every load path; and ``clue2geo doctor`` reports it.
Also: libstdc++ is loaded before llama_cpp is first imported (the Ubuntu 24.04 load crash)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_mod
import pytest
from click.testing import CliRunner

from clue2geo_sdk import Bundle, Geolocator
from clue2geo_sdk.cli import main
from clue2geo_sdk.cli.doctor import cpu_info, diagnose
from clue2geo_sdk.engines import base, make_engine
from clue2geo_sdk.engines.base import amx_possible, portable_model_defaults

# llama.cpp's system info on the lent H200 host's Intel Xeon (native build of 0.3.36 there)
SPR_SYSTEM_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
EPYC_SYSTEM_INFO = SPR_SYSTEM_INFO.replace("AMX_INT8 = 1 | ", "").replace("AVX_VNNI = 1 | ", "")


@pytest.fixture(params=["amx_cpu", "amx_build"])
def amx_host(request, monkeypatch) -> str:
    """This host made to look like an AMX one: by its CPU flags, or by llama.cpp's build."""
    if request.param == "amx_cpu":
        monkeypatch.setattr(base, "cpu_flags", lambda: {"avx512f", "amx_tile", "amx_int8", "amx_bf16"})
    else:
        monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: SPR_SYSTEM_INFO.encode())
    base.use_extra_bufts.cache_clear()
    yield request.param
    base.use_extra_bufts.cache_clear()


@pytest.fixture
def loads(monkeypatch, amx_host) -> list[bool]:
    """Every ``llama_model_load_from_file`` call's ``use_extra_bufts``, whichever binding it goes through."""
    seen: list[bool] = []
    real = llama_mod.llama_model_load_from_file

    def recording(path: bytes, params: Any) -> Any:
        seen.append(bool(params.use_extra_bufts))
        return real(path, params)

    monkeypatch.setattr(llama_mod, "llama_model_load_from_file", recording)
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", recording)
    return seen


def test_llama_cpp_defaults_would_use_extra_buffer_types() -> None:
    """The premise: left alone, llama.cpp turns them on (so a path that forgets the setting crashes AMX hosts)."""
    assert llama_mod.llama_model_default_params().use_extra_bufts is True


@pytest.mark.parametrize("engine", ["batched", "chat"])
def test_engines_load_without_extra_buffer_types(demo_bundle: Path, loads: list[bool], engine: str) -> None:
    b = Bundle.open(demo_bundle, verify=False)
    eng = make_engine(engine, b.file("vlm", "model"), b.file("vlm", "mmproj"), max_images=1, ctx_per_image=2048)
    eng.close()
    assert loads == [False]


@pytest.mark.parametrize("engine", ["batched", "chat"])
def test_geolocator_loads_without_extra_buffer_types(demo_bundle: Path, loads: list[bool], engine: str) -> None:
    """The path ``locate``, ``eval`` and training's teacher take."""
    with Geolocator.load(demo_bundle, device="cpu", engine=engine, max_in_flight=1):
        pass
    assert loads == [False]


def test_exporter_check_loads_without_extra_buffer_types(demo_bundle: Path, loads: list[bool]) -> None:
    from exporters.vlm_gguf import check_gguf_pair

    b = Bundle.open(demo_bundle, verify=False)
    check_gguf_pair(b.file("vlm", "model"), b.file("vlm", "mmproj"))
    assert loads == [False]


def test_portable_defaults_are_restored_after_the_load(amx_host) -> None:
    before = llama_mod.llama_model_default_params
    with portable_model_defaults():
        assert llama_mod.llama_model_default_params().use_extra_bufts is False
    assert llama_mod.llama_model_default_params is before
    assert llama_mod.llama_model_default_params().use_extra_bufts is True


def test_amx_is_recognised_from_the_build_or_the_cpu() -> None:
    assert amx_possible(SPR_SYSTEM_INFO, set())
    assert amx_possible(EPYC_SYSTEM_INFO, {"avx512f", "amx_tile"})
    assert not amx_possible(EPYC_SYSTEM_INFO, {"avx512f", "avx512_vnni", "avx2"})


def test_without_amx_the_repack_kernels_stay_on(monkeypatch) -> None:
    """Off only where needed: a host with neither AMX flags nor AMX kernels keeps llama.cpp's default."""
    monkeypatch.setattr(base, "cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: EPYC_SYSTEM_INFO.encode())
    base.use_extra_bufts.cache_clear()
    try:
        assert base.model_params(llama_cpp).use_extra_bufts is True
    finally:
        base.use_extra_bufts.cache_clear()


def test_libstdcxx_is_loaded_before_llama_cpp_is_first_imported(tmp_path: Path) -> None:
    """In a fresh process: the engine's first import of llama_cpp comes after the system libstdc++
    was loaded globally (every model load segfaulted on an Ubuntu 24.04 host otherwise)."""
    probe = tmp_path / "order.py"
    probe.write_text(
        "import ctypes, sys\n"
        "events = []\n"
        "real = ctypes.CDLL.__init__\n"
        "def init(self, name, *a, **k):\n"
        "    if name and 'libstdc++' in str(name): events.append('libstdc++')\n"
        "    return real(self, name, *a, **k)\n"
        "ctypes.CDLL.__init__ = init\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'llama_cpp': events.append('llama_cpp')\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        "from clue2geo_sdk.engines.base import load_llama_cpp\n"
        "assert 'llama_cpp' not in sys.modules, 'imported at module import time'\n"
        "load_llama_cpp(False)\n"
        "print(events)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, check=True).stdout
    events = eval(out.strip().splitlines()[-1])  # a list literal printed by the probe
    assert events[:2] == ["libstdc++", "llama_cpp"], events


SPR_CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""


def test_doctor_reads_amx_from_cpuinfo() -> None:
    info = cpu_info(SPR_CPUINFO)
    assert info["amx"] is True
    assert {"amx_tile", "amx_int8", "amx_bf16", "avx512f"} <= set(info["flags"])
    assert cpu_info("flags\t: fpu sse4_2 avx avx2\n")["amx"] is False


def test_doctor_reports_the_configuration(demo_bundle: Path) -> None:
    r = diagnose(demo_bundle)
    assert r["known_good"] is True, r["problems"]
    assert r["llama_cpp"]["extra_buffer_types"].startswith("off" if r["llama_cpp"]["amx_possible"] else "on")
    assert "CPUExecutionProvider" in r["onnxruntime"]["providers"]
    assert r["bundle"]["bytes"] > 0
    need = r["bundle"]["memory_need"]
    assert need["total"] == sum(need["parts"].values()) > r["bundle"]["bytes"] // 10
    res = CliRunner().invoke(main, ["doctor", "--bundle", str(demo_bundle), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["llama_cpp"]["system_info"] == r["llama_cpp"]["system_info"]
    text = CliRunner().invoke(main, ["doctor"])
    assert text.exit_code == 0 and "extra buffer types: " in text.output and "known-good" in text.output


def test_doctor_on_an_amx_host_says_off(amx_host) -> None:
    r = diagnose()
    assert r["llama_cpp"]["amx_possible"] is True  # from the CPU flags or the build, not the decision
    assert r["llama_cpp"]["extra_buffer_types"].startswith("off")
    assert r["known_good"] is True


def test_doctor_flags_extra_buffer_types_left_on_where_amx_runs(amx_host, monkeypatch) -> None:
    """Were the engines' decision wrong (on, on an AMX host), doctor says so: it is not known-good."""
    monkeypatch.setattr("clue2geo_sdk.cli.doctor.use_extra_bufts", lambda: True)
    r = diagnose()
    assert r["known_good"] is False
    assert any("AMX" in p for p in r["problems"])
