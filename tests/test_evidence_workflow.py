"""The README's evidence workflow, run start to finish by examples/evidence_workflow.sh (real bundle,
real pipeline, a TSA played by `openssl ts -reply`), so the walkthrough cannot drift from the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_the_evidence_workflow_runs_start_to_finish(demo_bundle: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    res = subprocess.run(
        ["bash", str(ROOT / "examples" / "evidence_workflow.sh"), str(demo_bundle), str(tmp_path / "wf")],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    wf = tmp_path / "wf"
    assert "every answer as recorded" in out  # the self-test passed
    assert "validated on validation-set (n = 2)" in out  # locate states the attached validation
    assert "unchanged since (with the report report.html)" in out
    report = (wf / "case" / "report.html").read_text()
    assert "validated on validation-set (n = 2)" in report and "investigative lead" in report
    assert "verified: chains to the given CA" in report  # the stamp beside the results, checked
    validation = json.loads((wf / "val" / "validation.json").read_text())
    bundle = json.loads((wf / "B" / "manifest.json").read_text())
    assert {c["role"] for c in bundle["components"]} >= {"validation", "selftest"}
    assert validation["evalset"]["n"] == 2
    assert json.loads((wf / "case" / "results.jsonld").read_text())["@graph"]
    assert (demo_bundle / "manifest.json").read_bytes() != (wf / "B" / "manifest.json").read_bytes()
    assert not (demo_bundle / "validation").exists()  # the lab's changes went to the copy only
