"""Runs on any x86-64 CPU: every path that loads a GGUF in this package loads it with llama.cpp's
extra buffer types off, so the AMX kernels that crash a native build on Sapphire Rapids and later
are never used. A host without AMX cannot show the crash, so these tests assert the setting itself,
at the call into llama.cpp, on every load path; and ``clue2geo doctor`` reports it."""

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
from clue2geo_sdk.doctor import cpu_info, diagnose
from clue2geo_sdk.engines import make_engine
from clue2geo_sdk.engines.base import portable_model_defaults


@pytest.fixture
def loads(monkeypatch) -> list[bool]:
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


def test_portable_defaults_are_restored_after_the_load() -> None:
    before = llama_mod.llama_model_default_params
    with portable_model_defaults():
        assert llama_mod.llama_model_default_params().use_extra_bufts is False
    assert llama_mod.llama_model_default_params is before
    assert llama_mod.llama_model_default_params().use_extra_bufts is True


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
    assert r["llama_cpp"]["extra_buffer_types"].startswith("off")
    assert "CPUExecutionProvider" in r["onnxruntime"]["providers"]
    assert r["bundle"]["bytes"] > 0
    res = CliRunner().invoke(main, ["doctor", "--bundle", str(demo_bundle), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["llama_cpp"]["system_info"] == r["llama_cpp"]["system_info"]
    text = CliRunner().invoke(main, ["doctor"])
    assert text.exit_code == 0 and "extra buffer types: off" in text.output and "known-good" in text.output


def test_doctor_flags_a_broken_bundle(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["doctor", "--bundle", str(tmp_path / "nope")])
    assert res.exit_code == 1
    assert "problem: bundle" in res.output
