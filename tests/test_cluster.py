"""`clue2geo locate --ray` on a real local Ray cluster (2 CPUs, loopback, no dashboard): every image once,
an actor killed mid-run, a driver stopped mid-run and resumed, a bad bundle copy refused, the extra."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from test_images import make_bad_inputs

from clue2geo_sdk.cli import main
from clue2geo_sdk.cli.common import EXIT_SOME_FAILED
from clue2geo_sdk.errors import BundleIntegrityError, MissingExtraError
from clue2geo_sdk.inputs.discover import discover
from clue2geo_sdk.runs.batch import run_batch
from clue2geo_sdk.runs.chain import verify_journal
from clue2geo_sdk.runs.records import IDENTITY_FIELDS

# Small generation budgets: the pipeline is the same, the runs stay short.
GEN = {"max_cue_tokens": 32, "max_answer_tokens": 32}
FLAGS = ["--max-cue-tokens", "32", "--max-answer-tokens", "32", "--in-flight", "2", "--batch-size", "2"]
RUN_TIMEOUT = 300  # seconds for one job on the 2-CPU test cluster (each takes 15-40 s here)


# -- without a cluster ------------------------------------------------------------------------------


def test_runtime_imports_nothing_of_ray() -> None:
    code = (
        "import sys, clue2geo_sdk, clue2geo_sdk.cli, clue2geo_sdk.runs.batch, clue2geo_sdk.cluster, "
        "clue2geo_sdk.cluster.shards, clue2geo_sdk.cluster.nodecheck\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow'))\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ray_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch, demo_bundle: Path, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    from clue2geo_sdk.cluster import locate_on_ray

    with pytest.raises(MissingExtraError, match=r"clue2geo\[cluster\]"):
        locate_on_ray([tmp_path], demo_bundle, tmp_path / "out")
    res = CliRunner().invoke(
        main, ["locate", str(tmp_path), "--bundle", str(demo_bundle), "--out", str(tmp_path / "o"), "--ray"]
    )
    assert res.exit_code == 1, res.output
    assert "pip install" in res.output and "clue2geo[cluster]" in res.output
    assert not (tmp_path / "o").exists()


def test_actor_plan() -> None:
    pytest.importorskip("ray", reason="the cluster extra: pip install -e '.[cluster]'")
    from clue2geo_sdk.cluster.plan import plan_actors

    gpu = plan_actors([{"CPU": 16, "GPU": 8}, {"CPU": 16, "GPU": 8}])
    assert (gpu.actors, gpu.num_gpus, gpu.device) == (16, 1.0, "cuda")
    assert plan_actors([{"CPU": 16, "GPU": 8}], device="cpu").device == "cpu"
    two = plan_actors([{"CPU": 2}], actors=2)  # the hazard of DESIGN §9: reads (0.25 CPU) must still fit
    assert two.device == "cpu" and two.num_cpus * 2 + 0.25 <= 2 and two.n_threads == 1
    one = plan_actors([{"CPU": 4}, {"CPU": 8}])  # one per node, half the smaller node's logical CPUs
    assert one.actors == 2 and one.n_threads == 2 and one.num_cpus == 1.0


def _linked_copy(src: Path, dst: Path) -> Path:
    """A bundle copy sharing the files (hard links) with its own manifest, safe to edit."""
    shutil.copytree(src, dst, copy_function=os.link)
    manifest = dst / "manifest.json"
    text = manifest.read_text()
    manifest.unlink()  # the link would write through to the session's bundle
    manifest.write_text(text)
    return dst


def _corrupt_manifest(bundle: Path) -> str:
    """Change one file's recorded sha256 in the manifest; return that file's path."""
    manifest = bundle / "manifest.json"
    doc = json.loads(manifest.read_text())
    comp = next(c for c in doc["components"] if c["role"] == "sbert")
    entry = next(iter(comp["files"].values()))
    entry["sha256"] = "0" * 64
    manifest.write_text(json.dumps(doc))
    return entry["path"]


def test_bundle_verified_once_per_node_and_job(demo_bundle: Path, tmp_path: Path) -> None:
    from clue2geo_sdk.bundle.manifest import Bundle
    from clue2geo_sdk.cluster.nodecheck import verify_once

    digest = Bundle.open(demo_bundle, verify=False).digest
    marks = tmp_path / "marks"
    assert verify_once(demo_bundle, digest, node="n1", job="j1", folder=marks)[1] is True
    assert verify_once(demo_bundle, digest, node="n1", job="j1", folder=marks)[1] is False  # the node's next actor
    assert verify_once(demo_bundle, digest, node="n2", job="j1", folder=marks)[1] is True
    assert verify_once(demo_bundle, digest, node="n1", job="j2", folder=marks)[1] is True
    with pytest.raises(BundleIntegrityError, match="the driver's has"):
        verify_once(demo_bundle, "f" * 64, node="n1", job="j3", folder=marks)
    bad = _linked_copy(demo_bundle, tmp_path / "bad")
    name = _corrupt_manifest(bad)
    with pytest.raises(BundleIntegrityError, match=name):
        verify_once(bad, Bundle.open(bad, verify=False).digest, node="n1", job="j1", folder=marks)


# -- on a real local cluster --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A real local Ray cluster: 2 CPUs, no dashboard; its address for drivers in subprocesses. Shut down
    at the end of the module."""
    ray = pytest.importorskip("ray", reason="the cluster extra: pip install -e '.[cluster]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """21 inputs: 15 photos (one in a sub-folder), 5 bad files, a symlink loop. Returns (folder, count)."""
    folder = tmp_path_factory.mktemp("case") / "case"
    photo = Path(__file__).resolve().parents[1] / "examples" / "images" / "summer_palace_beijing.jpg"
    make_bad_inputs(folder, photo)
    img = Image.open(photo).convert("RGB")
    for i in range(15):
        dest = folder / "sub" if i == 14 else folder
        dest.mkdir(exist_ok=True)
        img.crop((i * 20, 0, i * 20 + 320, 240)).save(dest / f"img_{i:02d}.jpg", quality=90)
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)
    return folder, 21


def _cli(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "clue2geo_sdk.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line.strip()]


def _shard_records(out: Path) -> list[dict]:
    return [r for p in sorted((out / "shards").glob("*.jsonl")) for r in _records(p)]


def _assert_once(out: Path, folder: Path, n: int) -> list[dict]:
    """The merged result holds one record per input, no input was recorded twice in the shards, and
    both the shards (one chain, in write order) and the merged file (its own) are hash chains."""
    from clue2geo_sdk.cluster.shards import verify_run

    assert verify_run(out).ok, verify_run(out).message()
    assert verify_journal(out / "results.jsonl").ok
    merged = _records(out / "results.jsonl")
    paths = [r["path"] for r in merged]
    assert len(paths) == len(set(paths)) == n, paths
    expected = {str(p if isinstance(p, Path) else Path(p.image)) for p in discover([folder], recursive=True)}
    assert set(paths) == expected
    keys = [(r["path"], r["image_sha256"], r["bundle_digest"], r["options_digest"]) for r in _shard_records(out)]
    assert len(keys) == len(set(keys)) == n
    return merged


def test_every_image_once_same_records_resume_export_report(
    cluster: str, images: tuple[Path, int], demo_bundle: Path, tmp_path: Path
) -> None:
    folder, n = images
    out = tmp_path / "run"
    args = ["locate", str(folder), "-r", "--bundle", str(demo_bundle), "--out", str(out), *FLAGS]
    res = _cli(*args, "--ray", cluster, "--actors", "2", "--report", str(tmp_path / "r.html"))
    assert res.returncode == EXIT_SOME_FAILED, res.stdout + res.stderr
    assert f"{n - 6} located, 6 failed, 0 skipped" in res.stdout, res.stdout + res.stderr
    merged = _assert_once(out, folder, n)
    assert (tmp_path / "r.html").read_text().count("<tr><td>") >= n - 6

    # the records are the single-machine runner's: same keys, same identity, same errors
    from clue2geo_sdk import Geolocator

    single = tmp_path / "single.jsonl"
    with Geolocator.load(demo_bundle, device="cpu", verify=False, **GEN) as geo:
        run_batch(geo, list(discover([folder], recursive=True)), single, in_flight=2)
    by_path = {r["path"]: r for r in _records(single)}
    for rec in merged:
        ref = by_path[rec["path"]]
        assert list(rec) == list(ref), rec["path"]  # chain of custody fields included
        assert {k: rec[k] for k in IDENTITY_FIELDS} == {k: ref[k] for k in IDENTITY_FIELDS}
        for k in ("status", "image_sha256", "error", "message", "lat", "lon", "candidates"):
            assert rec.get(k) == ref.get(k), (rec["path"], k)

    # each sealed JSONL shard has its Parquet twin holding the same records
    import pyarrow.parquet as pq

    for shard in (out / "shards").glob("*.jsonl"):
        table = pq.read_table(shard.with_suffix(".parquet"))
        assert [json.loads(r) for r in table.column("record").to_pylist()] == _records(shard)

    # resume: nothing left to do, nothing written twice
    res = _cli(*args, "--ray", cluster, "--actors", "1", "--resume")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"0 located, 0 failed, {n} skipped" in res.stdout
    _assert_once(out, folder, n)

    # export merges the shards; report works on the run folder and on the merged file
    for suffix in ("jsonl", "csv", "geojson"):
        res = CliRunner().invoke(main, ["export", str(out), "--to", str(tmp_path / f"all.{suffix}")])
        assert res.exit_code == 0, res.output
    assert len(_records(tmp_path / "all.jsonl")) == n
    assert len((tmp_path / "all.csv").read_text().splitlines()) == n + 1
    assert len(json.loads((tmp_path / "all.geojson").read_text())["features"]) == n - 6
    for src in (out, out / "results.jsonl"):
        res = CliRunner().invoke(
            main, ["report", str(src), "--bundle", str(demo_bundle), "--out", str(tmp_path / "c.html")]
        )
        assert res.exit_code == 0, res.output

    # audit verify follows the chain through the shards; an edited record is named by shard and line
    res = CliRunner().invoke(main, ["audit", "verify", str(out)])
    assert res.exit_code == 0 and f"{n} records" in res.output, res.output
    shard = sorted((out / "shards").glob("*.jsonl"))[-1]
    lines = shard.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"status": "', b'"status": "x', 1)
    shard.write_bytes(b"\n".join(lines))
    res = CliRunner().invoke(main, ["audit", "verify", str(out)])
    assert res.exit_code == 1 and f"{shard.name}:2: record_hash does not match" in res.output, res.output


def _our_actors(ray) -> list[tuple[str, dict]]:
    import ray._private.state as state

    job = ray.get_runtime_context().get_job_id()
    return [
        (aid, info)
        for aid, info in state.actors().items()
        if "GeolocatorActor" in str(info.get("ActorClassName")) and info.get("JobID") == job
    ]


def test_actor_killed_mid_run_every_image_once(
    cluster: str, images: tuple[Path, int], demo_bundle: Path, tmp_path: Path
) -> None:
    """The Python entry point, driven from this process; one actor is killed (ray.kill) while it works.
    ``no_restart=False``: the way a worker dies (crash, OOM kill, lost node), so Ray restarts the actor and
    retries its batch; a permanent ``ray.kill`` is an operator's stop and fails the job by design."""
    import ray
    from ray._raylet import ActorID

    from clue2geo_sdk.cluster import locate_on_ray

    folder, n = images
    out = tmp_path / "run"
    result: dict = {}

    def drive() -> None:
        try:
            result["summary"] = locate_on_ray(
                [folder], demo_bundle, out, recursive=True, actors=2, in_flight=2, batch_size=2,
                records_per_shard=4, **GEN,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()
    deadline = time.monotonic() + RUN_TIMEOUT
    killed = None
    while driver.is_alive() and time.monotonic() < deadline and killed is None:
        time.sleep(0.3)
        if (out / "shards").is_dir() and len(_shard_records(out)) >= 3:
            alive = [(aid, i) for aid, i in _our_actors(ray) if i.get("State") == "ALIVE"]
            if alive:
                aid = alive[0][0]
                handle = ray._private.worker.global_worker.core_worker.get_actor_handle(ActorID.from_hex(aid))
                ray.kill(handle, no_restart=False)
                killed = aid
    driver.join(max(1.0, deadline - time.monotonic()))
    assert not driver.is_alive(), "the job did not finish after an actor was killed"
    assert "error" not in result, result.get("error")
    assert killed is not None, "the job finished before an actor could be killed"
    restarts = {aid: info.get("NumRestarts") for aid, info in _our_actors(ray)}
    assert restarts.get(killed, 0) >= 1, restarts
    summary = result["summary"]
    assert summary.ok + summary.error == n
    _assert_once(out, folder, n)
    assert len(summary.shards) >= 2  # records_per_shard=4: several sealed shards, each with its twin
    assert all((out / "shards" / s).with_suffix(".parquet").exists() for s in summary.shards)


def test_driver_stopped_mid_run_then_resume(
    cluster: str, images: tuple[Path, int], demo_bundle: Path, tmp_path: Path
) -> None:
    folder, n = images
    out = tmp_path / "run"
    args = ["locate", str(folder), "-r", "--bundle", str(demo_bundle), "--out", str(out), *FLAGS]
    cmd = [sys.executable, "-m", "clue2geo_sdk.cli", *args, "--ray", cluster, "--actors", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "shards").is_dir() and len(_shard_records(out)) >= 5:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the driver finished before it could be stopped"
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run: no chance to clean up
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    done = len({r["path"] for r in _shard_records(out)})
    assert 5 <= done < n
    assert not (out / "results.jsonl").exists()
    res = _cli(*args, "--ray", cluster, "--actors", "2")
    assert res.returncode == 1 and "--resume" in res.stderr, res.stdout + res.stderr  # refuses to overwrite
    res = _cli(*args, "--ray", cluster, "--actors", "2", "--resume")
    assert res.returncode == EXIT_SOME_FAILED, res.stdout + res.stderr
    assert f"{done} skipped" in res.stdout, res.stdout
    _assert_once(out, folder, n)
    assert all(p.with_suffix(".parquet").exists() for p in (out / "shards").glob("*.jsonl"))


def test_manifest_and_bad_bundle_copy(
    cluster: str, images: tuple[Path, int], demo_bundle: Path, tmp_path: Path
) -> None:
    """A CSV manifest of paths (relative to it) runs like a folder; a node whose bundle copy does not match
    its manifest stops the job before any image is read, naming the file."""
    folder, _ = images
    manifest = folder.parent / "list.csv"
    names = ["case/img_00.jpg", "case/img_01.jpg", "case/notes.jpg", "case/missing.jpg"]
    manifest.write_text("path\n" + "\n".join(names) + "\n")
    out = tmp_path / "run"
    res = _cli("locate", str(manifest), "--bundle", str(demo_bundle), "--out", str(out), *FLAGS, "--ray", cluster)
    assert res.returncode == EXIT_SOME_FAILED, res.stdout + res.stderr
    recs = {r["path"]: r for r in _records(out / "results.jsonl")}
    assert sorted(recs) == sorted(names)
    assert [recs[p]["status"] for p in names] == ["ok", "ok", "error", "error"]
    assert recs["case/missing.jpg"]["message"].startswith("case/missing.jpg")

    bad = _linked_copy(demo_bundle, tmp_path / "bad")
    name = _corrupt_manifest(bad)
    out = tmp_path / "bad-run"
    res = _cli("locate", str(folder), "--bundle", str(bad), "--out", str(out), *FLAGS, "--ray", cluster, timeout=180)
    assert res.returncode == 1, res.stdout + res.stderr
    assert name in res.stderr and "corrupt" in res.stderr, res.stderr
    assert not _shard_records(out)


def test_photo_gallery_on_the_cluster(
    cluster: str, images: tuple[Path, int], demo_bundle: Path, tmp_path: Path
) -> None:
    """`locate --ray --gallery G`: the actors take their references from the analyst's photo gallery, and
    the records are the single-machine run's with the same gallery; a gallery made for another image
    tower is refused by the driver before the cluster is asked for anything."""
    from test_reference_gallery import PLACES, exif_value, geotagged_jpeg

    from clue2geo_sdk import Geolocator
    from clue2geo_sdk.options import Options
    from clue2geo_sdk.retrieval.photo_build import build_gallery
    from clue2geo_sdk.retrieval.photos import read_manifest

    src = tmp_path / "refs"
    src.mkdir()
    for i, (lat, lon) in enumerate(PLACES):
        geotagged_jpeg(src / f"ref{i}.jpg", lat, lon, seed=i)
    gallery = tmp_path / "gallery"
    build_gallery(src, demo_bundle, gallery)
    folder, _ = images
    inputs = [folder / "img_00.jpg", folder / "img_01.jpg"]
    out = tmp_path / "run"
    extra = ["--gallery", str(gallery), "--nearest-neighbour-candidate"]
    res = _cli("locate", *map(str, inputs), "--bundle", str(demo_bundle), "--out", str(out), *FLAGS, *extra,
               "--ray", cluster)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    merged = {r["path"]: r for r in _records(out / "results.jsonl")}
    assert sorted(merged) == sorted(map(str, inputs))
    digest = read_manifest(gallery)["content_sha256"]
    places = {(exif_value(lat), exif_value(lon)) for lat, lon in PLACES}
    for rec in merged.values():
        assert rec["status"] == "ok" and rec["gallery_digest"] == digest, rec
        near = [(c["lat"], c["lon"]) for c in rec["candidates"] if c["source"] == "gallery_nearest"]
        assert len(near) == 1 and min(abs(near[0][0] - a) + abs(near[0][1] - b) for a, b in places) < 1e-4

    single = tmp_path / "single.jsonl"
    load = {"device": "cpu", "verify": False, "gallery": gallery, "nearest_neighbour_candidate": True, **GEN}
    with Geolocator.load(demo_bundle, **load) as geo:
        run_batch(geo, inputs, single, in_flight=2)
    for ref in _records(single):
        rec = merged[ref["path"]]
        assert {k: rec[k] for k in IDENTITY_FIELDS} == {k: ref[k] for k in IDENTITY_FIELDS}
        for k in ("lat", "lon", "candidates", "retrieval"):
            assert rec.get(k) == ref.get(k), (ref["path"], k)

    # a node whose copy has the same rows but another manifest (index settings, a rebuild) is refused
    from clue2geo_sdk.bundle.manifest import Bundle
    from clue2geo_sdk.cluster.actor import GeolocatorActor
    from clue2geo_sdk.cluster.job import _gallery_digest
    from clue2geo_sdk.errors import BundleIntegrityError
    from clue2geo_sdk.runs.records import identity_of

    b = Bundle.open(demo_bundle, verify=False)
    digest, driver_manifest = _gallery_digest(gallery, b)
    ident = identity_of(b, Options.from_kwargs(**GEN, nearest_neighbour_candidate=True), gallery_digest=digest)
    ctor = {"bundle": str(demo_bundle), "ident": ident, "in_flight": 1, "verify": False}
    load = {"device": "cpu", "gallery": str(gallery), "nearest_neighbour_candidate": True, **GEN}
    GeolocatorActor(**ctor, load=load, gallery_manifest=driver_manifest).geo.close()  # the same copy: accepted
    manifest = json.loads((gallery / "manifest.json").read_text())
    (gallery / "manifest.json").write_text(json.dumps({**manifest, "index": {**manifest["index"], "graphs": 2}}))
    with pytest.raises(BundleIntegrityError, match=f"manifest sha256 .* the driver's has {driver_manifest}"):
        GeolocatorActor(**ctor, load=load, gallery_manifest=driver_manifest)

    manifest["image_tower_sha256"] = "0" * 64
    (gallery / "manifest.json").write_text(json.dumps(manifest))
    res = _cli("locate", str(inputs[0]), "--bundle", str(demo_bundle), "--out", str(tmp_path / "refused"),
               *FLAGS, *extra, "--ray", cluster, timeout=120)  # fmt: skip
    assert res.returncode == 1 and "image tower" in res.stderr and str(gallery) in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "refused" / "shards").exists()
