"""Shared fixtures: one demo bundle per test session (built for real, ~1 minute), reused read-only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = ROOT / "examples" / "images"
# Small generation budgets keep the real llama.cpp runs short; the pipeline is the same.
FAST = {"max_cue_tokens": 96, "max_answer_tokens": 48}


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CLUE2GEO_TEST_BUNDLE reuses a built bundle (copied, since tests flip bytes); else build one."""
    given = os.environ.get("CLUE2GEO_TEST_BUNDLE")
    out = tmp_path_factory.mktemp("bundle") / "demo"
    if given:
        shutil.copytree(given, out)
    else:
        from exporters.bundle_builder import build_demo

        build_demo(out, seed=0)
    return out


@pytest.fixture(scope="session")
def geo(demo_bundle: Path):
    from clue2geo_sdk import Geolocator

    with Geolocator.load(demo_bundle, device="cpu", **FAST) as g:
        yield g


@pytest.fixture
def photo() -> Path:
    return EXAMPLE_IMAGES / "summer_palace_beijing.jpg"
