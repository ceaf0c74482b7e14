"""A first run on a fresh machine works with only what the project installs, and every 'not installed'
message names an install command that works."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

from clue2geo_sdk import MissingExtraError

ROOT = Path(__file__).resolve().parents[1]


def test_export_extra_brings_the_sdist_build_backend() -> None:
    """pip prepares the llama-cpp-python sdist's metadata with scikit-build-core (no build isolation)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("scikit-build-core") for r in extras["export"]), extras["export"]
    pins = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^scikit-build-core==\d", pins, re.M) and re.search(r"^pillow-heif==\d", pins, re.M)
    assert importlib.util.find_spec("scikit_build_core") is not None


def test_ci_runs_the_readme_command_with_an_empty_project_cache() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*python3 -m venv .*)\n```", readme)
    assert len(commands) == 2 and "--overwrite" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == commands[1]  # exactly the README's test command
    setup = "\n".join(ci[:-1])
    assert 'CLUE2GEO_CACHE="$(mktemp -d)"' in setup and "export CLUE2GEO_CACHE" in setup
    assert "## Release checklist" in readme or "### Release checklist" in readme


def test_missing_build_backend_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from exporters import vlm_gguf

    real = importlib.util.find_spec
    monkeypatch.setattr(vlm_gguf, "CACHE", tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "scikit_build_core" else real(n, *a))
    with pytest.raises(MissingExtraError, match=r"-e '\.\[export\]'") as err:
        vlm_gguf.llama_cpp_source()
    assert "scikit_build_core" in str(err.value) and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_converter_is_fetched_into_an_empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What a fresh machine does on its first bundle build: pip downloads the sdist (from PyPI)."""
    from exporters import vlm_gguf

    monkeypatch.setattr(vlm_gguf, "CACHE", tmp_path)
    root = vlm_gguf.llama_cpp_source()
    assert root.parent == tmp_path and (root / "convert_hf_to_gguf.py").is_file()
    assert (root / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert vlm_gguf.llama_cpp_source() == root  # cached from now on


def test_missing_extra_messages_name_a_working_command() -> None:
    extra = str(MissingExtraError("torch", "export", "'clue2geo bundle demo'"))
    assert "pip install -c constraints.txt -e '.[export]'" in extra and "clue2geo[export]" in extra
    core = str(MissingExtraError("llama_cpp", None, "the VLM", install="pip install llama-cpp-python"))
    assert core.endswith("Install it with: pip install llama-cpp-python") and "[" not in core
    assert "pip install pillow_heif" in str(MissingExtraError("pillow_heif", None, "HEIC"))
