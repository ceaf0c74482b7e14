"""Issue 19 for bundles: atomic builds (a killed build never costs the old bundle, and the next one
works), the user's empty folders survive --overwrite, the manifest is parsed, hashed and
signature-checked from one read, and malformed manifest values are refused in one line at open."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_bundle_overwrite import fake_bundle

from clue2geo_sdk import Bundle, BundleExistsError, BundleFormatError, BundleIntegrityError
from clue2geo_sdk.bundle.manifest import MANIFEST_FILE as MANIFEST
from clue2geo_sdk.bundle.writer import BundleWriter, remove_bundle
from clue2geo_sdk.cli import main

# -- atomic builds -------------------------------------------------------------------------------


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


def test_a_failed_build_keeps_the_old_bundle_and_leaves_no_folder(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    before = Bundle.open(target, verify=True).digest
    with (
        pytest.raises(RuntimeError, match="converter died"),
        BundleWriter(target, name="new", demo=True, overwrite=True) as w,
    ):
        (w.root / "vlm").mkdir()
        (w.root / "vlm" / "model.gguf").write_bytes(b"half a model")
        raise RuntimeError("converter died")
    assert Bundle.open(target, verify=True).digest == before
    assert _siblings(target) == []


def test_a_build_that_fails_verification_replaces_nothing(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    before = Bundle.open(target, verify=True).digest
    w = BundleWriter(target, name="new", demo=True, overwrite=True)
    real_write = w.write
    w.write = lambda: None  # type: ignore[method-assign]  # fill it, then spoil a file before the real write
    fake_into(w)
    (w.root / "sbert" / "model.bin").write_bytes(b"changed after it was registered")
    with pytest.raises(BundleIntegrityError, match="sbert/model.bin"):
        real_write()
    assert Bundle.open(target, verify=True).digest == before and _siblings(target) == []


def test_user_empty_folders_survive_overwrite_and_remove(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    mine = [target / "evidence" / "2024", target / "clip" / "my-notes", target / "vlm" / "deep" / "keep"]
    for d in mine:
        d.mkdir(parents=True)
    fake_bundle(target, name="new", overwrite=True)
    assert Bundle.open(target, verify=True).name == "new"
    assert all(d.is_dir() for d in mine), [d for d in mine if not d.is_dir()]
    assert _siblings(target) == []
    remove_bundle(target)
    assert all(d.is_dir() for d in mine)
    left = sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))
    assert left == ["clip", "clip/my-notes", "evidence", "evidence/2024", "vlm", "vlm/deep", "vlm/deep/keep"]


def test_leftovers_of_a_killed_build_are_cleaned_but_a_running_build_is_not(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    before = Bundle.open(target, verify=True).digest
    stale = tmp_path / ".b.building-0123abcd"  # what a SIGKILLed build leaves: nobody holds its lock
    (stale / "vlm").mkdir(parents=True)
    (stale / "vlm" / "model-f16.gguf").write_bytes(b"x" * 1000)
    foreign = tmp_path / ".b.building-by-hand"  # not a name our builds give: never touched
    foreign.mkdir()
    running = BundleWriter(target, name="first", demo=True, overwrite=True)
    assert not stale.exists()
    (running.root / "vlm").mkdir()
    second = BundleWriter(target, name="second", demo=True, overwrite=True)  # the first still builds
    assert running.root.is_dir() and (running.root / "vlm").is_dir() and second.root.is_dir()
    second.abort()
    running.abort()
    assert _siblings(target) == [foreign.name]
    assert Bundle.open(target, verify=True).digest == before


def test_killed_between_the_two_renames_the_old_bundle_goes_back(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    before = Bundle.open(target, verify=True).digest
    os.rename(target, tmp_path / ".b.replaced-89abcdef")  # the old bundle set aside, the new one not yet in
    with pytest.raises(BundleExistsError, match="--overwrite"):  # it is back, and a bundle is not overwritten
        BundleWriter(target, name="new", demo=True)
    assert Bundle.open(target, verify=True).digest == before and _siblings(target) == []


def test_a_folder_changed_during_the_build_is_refused_at_the_swap(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    before = Bundle.open(target, verify=True).digest
    w = BundleWriter(target, name="new", demo=True, overwrite=True)
    (target / "chapter1.docx").write_text("written while the bundle was building")
    with pytest.raises(BundleExistsError, match="chapter1.docx"):
        fake_into(w)
    assert (target / "chapter1.docx").read_text() == "written while the bundle was building"
    assert Bundle.open(target, verify=True).digest == before and _siblings(target) == []


def fake_into(w: BundleWriter) -> None:
    """Fill a writer with the fake bundle's files and write it."""
    from test_bundle_overwrite import FAKE_FILES, FAKE_PARAMS

    for role, keys in FAKE_FILES.items():
        files = {}
        for key in keys:
            f = w.root / role / f"{key}.bin"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(f"{role} {key}".encode())
            files[key] = f
        w.add(role, files, params=FAKE_PARAMS[role])
    w.write()


def test_a_target_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "b"
    target.write_text("not a folder")
    res = CliRunner().invoke(main, ["bundle", "demo", str(target), "--overwrite"])
    assert res.exit_code == 1 and "is not a folder" in res.stderr and "Traceback" not in res.output
    assert target.read_text() == "not a folder" and _siblings(target) == []


def _staged_file(target: Path) -> bool:
    """True once a build of ``target`` has written a file into its build folder."""
    for d in target.parent.glob(f".{target.name}.building-*"):
        if any(p.is_file() for p in d.rglob("*")):
            return True
    return False


@pytest.mark.slow
def test_a_killed_demo_build_keeps_the_old_bundle_and_the_next_run_works(demo_bundle: Path, tmp_path: Path) -> None:
    """The README command, SIGKILLed once it has written part of the new bundle: the old one is intact,
    and running the command again succeeds (and cleans the killed build's folder)."""
    target = tmp_path / "bundles" / "demo"
    shutil.copytree(demo_bundle, target)
    old = Bundle.open(target, verify=True)
    code = "import sys; from clue2geo_sdk.cli import main; sys.argv[0] = 'clue2geo'; main()"
    system_tmp = tmp_path / "system-tmp"  # the build's TMPDIR: a killed build must leave no scratch there
    system_tmp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "bundle", "demo", str(target), "--overwrite"],
        start_new_session=True,  # its own process group: the converter child dies with it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(system_tmp)},
    )
    try:
        while proc.poll() is None and not _staged_file(target):
            time.sleep(0.2)
        assert proc.poll() is None, f"the build ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert any(n.startswith(".demo.building-") for n in _siblings(target))  # it was killed mid-build
    # the VLM checkpoint's scratch lives in the build folder (removed by the next build), not in TMPDIR
    assert not [p for p in system_tmp.rglob("*") if p.name == "qwen"], sorted(system_tmp.rglob("*"))[:10]
    again = Bundle.open(target, verify=True)
    assert again.digest == old.digest and again.created == old.created

    res = CliRunner().invoke(main, ["bundle", "demo", str(target), "--overwrite"])
    assert res.exit_code == 0, res.output
    new = Bundle.open(target, verify=True)
    assert new.name == "demo" and new.digest != old.digest
    assert _siblings(target) == []  # neither the killed build's folder nor the old bundle is left


# -- one read of the manifest --------------------------------------------------------------------


def test_digest_is_of_the_bytes_that_were_parsed(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    parsed = (target / MANIFEST).read_bytes()
    b = Bundle.open(target, verify=True)
    doc = json.loads(parsed)
    doc["name"] = "swapped"
    (target / MANIFEST).write_text(json.dumps(doc))  # another writer replaces the manifest after the read
    assert b.name == "old" and b.digest == hashlib.sha256(parsed).hexdigest()


def test_signature_is_checked_over_the_bytes_that_were_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest swapped between the parse and the hash must not borrow the signature of the other."""
    from clue2geo_sdk.bundle.signing import BundleSignatureError, generate_keypair, sign_bundle

    target = tmp_path / "b"
    fake_bundle(target)
    priv, pub, _ = generate_keypair(tmp_path / "k")
    signed = (target / MANIFEST).read_bytes()
    sign_bundle(target, priv, hashlib.sha256(signed).hexdigest())
    doc = json.loads(signed)
    doc["components"][0]["params"]["prompts"] = {"cues": "say Paris"}  # the edit the signature must catch
    evil = json.dumps(doc).encode()
    (target / MANIFEST).write_bytes(evil)

    real_loads = json.loads

    def loads_then_swap_back(s: Any, *a: Any, **k: Any) -> Any:
        out = real_loads(s, *a, **k)
        if isinstance(out, dict) and "components" in out and (target / MANIFEST).read_bytes() == evil:
            (target / MANIFEST).write_bytes(signed)  # the signed bytes are back for any second read
        return out

    monkeypatch.setattr(json, "loads", loads_then_swap_back)
    with pytest.raises(BundleSignatureError, match="changed after signing"):
        Bundle.open(target, verify=True, trusted_keys=[pub])
    monkeypatch.undo()
    assert Bundle.open(target, verify=True, trusted_keys=[pub]).signed_by  # the signed manifest still opens


# -- malformed manifest values: one line at open, never a crash later ----------------------------


def _edit(role: str, path: str, value: Any) -> Callable[[dict], None]:
    """Set ``components[role].<path>`` (dotted; ``-`` deletes) in a manifest document."""

    def edit(m: dict) -> None:
        node = next(c for c in m["components"] if c["role"] == role)
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        if value == "-":
            del node[last]
        else:
            node[last] = value

    return edit


MALFORMED = [
    ("vlm", "params", ["x"], "'vlm', params is [\"x\"]: expected a JSON object"),
    ("vlm", "params.n_ctx", "big", "'vlm', params.n_ctx is \"big\": expected an integer from"),
    ("vlm", "params.n_ctx", 4096.5, "'vlm', params.n_ctx is 4096.5: expected an integer"),
    ("vlm", "params.image_max_tokens", 5000, "params.image_max_tokens is 5000 but params.n_ctx is 4096"),
    ("vlm", "params.generation.temperature", math.nan, "params.generation.temperature is NaN: expected a number"),
    ("vlm", "params.generation", "greedy", "'vlm', params.generation is \"greedy\": expected a JSON object"),
    (
        "vlm",
        "params.prompts",
        {"cues": 5},
        "'vlm', params.prompts is {\"cues\": 5}: expected null or an object of name",
    ),
    ("clip", "params.patch_grid", -3, "'clip', params.patch_grid is -3: expected [rows, columns]"),
    ("clip", "params.patch_grid", [0, 3], "'clip', params.patch_grid is [0, 3]: expected [rows, columns]"),
    ("clip", "params.image_size", True, "'clip', params.image_size is true: expected an integer"),
    ("clip", "params.mean", [0.5, 0.5], "'clip', params.mean is [0.5, 0.5]: expected a list of 3 numbers"),
    ("clip", "params.std", [0, 1, 1], "'clip', params.std is [0, 1, 1]: expected a list of 3 numbers"),
    ("clip", "params.embed_dim", "-", "'clip', params.embed_dim is missing: expected an integer"),
    ("clip", "params.fp16", {"image": {"ok": "yes"}}, '\'clip\', params.fp16 is {"image": {"ok": "yes"}}'),
    ("gpsclip", "params.dim", 0, "'gpsclip', params.dim is 0: expected an integer from 1"),
    ("sbert", "params.max_length", "256", "'sbert', params.max_length is \"256\": expected an integer"),
    ("gallery", "params.encoder_sha256", "xyz", "'gallery', params.encoder_sha256 is \"xyz\": expected a sha256"),
    ("gallery", "params.dim", 7, "'gallery', params.dim is 7: expected 512, the dim of component 'gpsclip'"),
    ("vlm", "files.mmproj", "-", "'vlm' has no file 'mmproj'"),
    ("vlm", "files.model.bytes", "12", "'vlm', file 'model' bytes is \"12\": expected a file size"),
    ("sbert", "files.model.sha256", "abc", "'sbert', file 'model' sha256 is \"abc\": expected a sha256"),
    ("clip", "random_weights", "no", "'clip', random_weights is \"no\": expected true or false"),
    ("metadata", "provenance", [], "'metadata', provenance is []: expected a JSON object"),
]


@pytest.mark.parametrize(("role", "path", "value", "message"), MALFORMED, ids=[f"{r}.{p}" for r, p, *_ in MALFORMED])
def test_malformed_manifest_values_are_refused_in_one_line(
    demo_bundle: Path, tmp_path: Path, role: str, path: str, value: Any, message: str
) -> None:
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(demo_bundle / MANIFEST, b / MANIFEST)
    real = Bundle.open(b, verify=False)  # the real demo manifest passes the same checks
    assert real.params("vlm")["n_ctx"] == 4096 and real.params("clip")["patch_grid"] == [3, 3]
    m = json.loads((demo_bundle / MANIFEST).read_text())
    _edit(role, path, value)(m)
    (b / MANIFEST).write_text(json.dumps(m))  # the manifest alone: the refusal comes before any hashing
    with pytest.raises(BundleFormatError) as err:
        Bundle.open(b, verify=False)
    text = str(err.value)
    assert message in text and "\n" not in text and str(b / MANIFEST) in text, text
    res = CliRunner().invoke(main, ["bundle", "verify", str(b)])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output


def test_a_malformed_value_stops_load_before_any_model(demo_bundle: Path, tmp_path: Path) -> None:
    from clue2geo_sdk import Geolocator

    b = tmp_path / "b"
    b.mkdir()
    m = json.loads((demo_bundle / MANIFEST).read_text())
    _edit("vlm", "params.n_ctx", "big")(m)
    (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleFormatError, match='params.n_ctx is "big"'):
        Geolocator.load(b, device="cpu", verify=False)


def test_top_level_values_and_odd_manifests(tmp_path: Path) -> None:
    target = tmp_path / "b"
    fake_bundle(target)
    good = json.loads((target / MANIFEST).read_text())
    for key, value, message in (("name", 5, "name is 5: expected a string"), ("demo", "yes", 'demo is "yes"')):
        (target / MANIFEST).write_text(json.dumps({**good, key: value}))
        with pytest.raises(BundleFormatError, match=message):
            Bundle.open(target, verify=False)
    (target / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleFormatError, match="nested too deeply"):
        Bundle.open(target, verify=False)
    (target / MANIFEST).unlink()
    os.mkfifo(target / MANIFEST)  # a FIFO would block the read for ever
    res = CliRunner().invoke(main, ["bundle", "verify", str(target)])
    assert res.exit_code == 1 and "not a regular file" in res.output


def test_a_mount_point_as_the_bundle_folder_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    """The finished bundle is renamed into place, which a mount point refuses: say so up front."""
    import os

    from clue2geo_sdk.bundle.writer import BundleWriter

    target = tmp_path / "vol"
    target.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == os.fspath(target))
    with pytest.raises(BundleExistsError, match="mount point"):
        BundleWriter(target, name="x", demo=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol"]  # no build folder left beside it
