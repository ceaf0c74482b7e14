"""bench/device.sh, the prepared GPU run: its dry run passes here (CPU, no network) and fails naming each
broken input; a run whose steps all fail still writes its one JSON, each step with its status and log;
and bench/kv_capacity.py's arithmetic against a count by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device.sh"


def device_sh(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "C2G_PYTHON": sys.executable, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dry_run_passes() -> None:
    r = device_sh("--dry-run")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "device.sh --dry-run: all checks passed" in r.stdout
    assert "FAIL" not in r.stdout
    for check in ("pipeline.py takes --in-flight", "CMAKE_ARGS well formed", "collect.py writes one JSON", "synth.py"):
        assert f"ok   {check}" in r.stdout, check


def test_dry_run_fails_naming_each_broken_input(tmp_path: Path) -> None:
    # a pipeline.py without --token-probe, a constraints file that no longer pins duckdb, no kv_capacity.py
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(
        "import argparse\nap = argparse.ArgumentParser()\n"
        "for f in ('--bundle', '--images', '--in-flight', '--engines', '--max-cue-tokens', '--max-answer-tokens',\n"
        "          '--python-probe'):\n"
        "    ap.add_argument(f)\n"
        "ap.add_argument('--device', choices=['cpu', 'cuda'], help='engines: batched, chat')\nap.parse_args()\n"
    )
    constraints = tmp_path / "constraints.txt"
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    constraints.write_text("\n".join(x for x in lines if not x.startswith("duckdb==")) + "\n")
    env = {
        "C2G_PIPELINE": str(pipeline),
        "C2G_CONSTRAINTS": str(constraints),
        "C2G_KV_CAPACITY": str(tmp_path / "missing.py"),
    }
    r = device_sh("--dry-run", env=env)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert "FAIL pipeline.py takes --token-probe" in out
    assert "ok   pipeline.py takes --in-flight" in out  # the checks after a failure still ran
    assert "FAIL pins: every carried package is pinned" in out and "duckdb is not pinned" in out
    assert "FAIL kv_capacity.py exists" in out
    assert "device.sh --dry-run: 4 check(s) failed" in out, out[-3000:]


def _tar_parts(src: Path, group: str, carry: Path) -> None:
    with tarfile.open(carry / f"{group}.tar.part-00", "w") as tar:
        tar.add(src, arcname=group)


def test_a_run_whose_steps_fail_still_writes_one_json(tmp_path: Path) -> None:
    """A carry with a bogus sdist and no wheels: the builds fail, what needs them is skipped with its
    reason, what needs nothing (the KV table) runs, and the JSON holds every step."""
    carry, stage = tmp_path / "carry", tmp_path / "stage"
    for d in (carry, stage / "llama", stage / "wheels", stage / "ortgpu"):
        d.mkdir(parents=True)
    (stage / "llama" / "llama_cpp_python-0.3.36.tar.gz").write_text("not an sdist")
    (stage / "llama" / "diskcache-5.6.3-py3-none-any.whl").write_text("not a wheel")
    with tarfile.open(carry / "llama.tar", "w") as tar:
        for f in (stage / "llama").iterdir():
            tar.add(f, arcname=f.name)
    _tar_parts(stage / "wheels", "wheels", carry)
    _tar_parts(stage / "ortgpu", "ortgpu", carry)
    sums = subprocess.run(
        ["sha256sum", "llama.tar", "wheels.tar.part-00", "ortgpu.tar.part-00"],
        cwd=carry,
        capture_output=True,
        text=True,
    )
    (carry / "SHA256SUMS").write_text(sums.stdout)
    out = tmp_path / "out"
    r = device_sh("--carry", str(carry), "--work", str(tmp_path / "work"), "--out", str(out), "--budget", "240")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "device-bench.json").read_text())
    steps = doc["steps"]
    assert doc["ok"] is False
    assert {
        n: steps[n]["status"] for n in ("carry_llama", "carry_wheels", "carry_ortgpu", "kv_capacity")
    } == dict.fromkeys(("carry_llama", "carry_wheels", "carry_ortgpu", "kv_capacity"), "ok")
    assert {n: steps[n]["status"] for n in ("llama_build", "wheels", "ort_gpu")} == dict.fromkeys(
        ("llama_build", "wheels", "ort_gpu"), "failed"
    )
    assert any("pillow-heif" in line for line in steps["wheels"]["log_tail"]), steps["wheels"]["log_tail"]
    for name in ("synth_bundle", "ort_tiny", "pytest_gpu", "bench_chat", "bench_batched_if1", "bench_batched_if32"):
        assert steps[name]["status"] == "skipped" and steps[name]["note"], (name, steps[name])
    assert [row["gpu"] for row in doc["results"]["kv_capacity"]["rows"]][:3] == [
        "24 GB (RTX 4090 / L4-class)",
        "80 GB (H100 / A100)",
        "141 GB (H200)",
    ]


def _kv_capacity():
    spec = importlib.util.spec_from_file_location("kv_capacity", ROOT / "bench" / "kv_capacity.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_kv_capacity_arithmetic_matches_a_hand_count() -> None:
    kv = _kv_capacity()
    # K and V x 28 layers x 4 KV heads x 128 dims x 2 bytes (f16)
    assert kv.kv_bytes_per_cell() == 57_344
    need = kv.ImageNeed()
    # prefix 361 + 391 once, suffixes 1,900, budgets 512 + 4 x 128
    assert need.cells("shared") == 3_676
    # the 752-token prefix in each of the 6 sequences' streams
    assert need.cells("per_sequence") == 7_436
    assert need.cells("n_ctx") == 24_576
    # vision graph: 1,564 patches x (6 x 16 heads x 1,564 + 16 x (1,280 + 3,420))
    assert kv.vision_compute(391) == 352_438_016
    # 1 image = 6 sequences: ceil(512/6) x 6 = 516 tokens x 4 B x (152,064 + 4 x 3,584 + 2 x 18,944) + 6 logits rows
    assert kv.compute_buffers(6) == 421_650_432 + 3_649_536
    # 3 images = 18 sequences: 522 tokens, 18 logits rows
    assert kv.compute_buffers(18) == 426_553_344 + 10_948_608
    # a GPU holding exactly the fixed part + 3 images' shared KV + their compute buffers fits 3; one byte less, 2
    w, m, e, o = 1000, 2000, 3000, 4000
    fixed = w + m + e + o + 352_438_016
    exact = fixed + 3 * 210_796_544 + 437_501_952
    cap = kv.capacity("t", exact, need, weights=w, mmproj=m, encoders=e, overhead=o)
    assert (cap.fixed_bytes, cap.per_image_bytes["shared"], cap.images["shared"]) == (fixed, 210_796_544, 3)
    assert kv.capacity("t", exact - 1, need, weights=w, mmproj=m, encoders=e, overhead=o).images["shared"] == 2
    assert cap.per_image_bytes["n_ctx"] == 1_409_286_144 and cap.images["n_ctx"] == 0
    # one context's 256 sequences cap an H200's shared-KV count at 42 images
    h200 = kv.capacity("h200", 143_771 * 2**20, need)
    assert h200.images["shared"] > 42 and h200.images_capped["shared"] == 42
