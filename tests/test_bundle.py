"""Bundle format v1: open, verify, and every refusal the format promises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from clue2geo_sdk import Bundle, BundleFormatError, BundleIntegrityError, BundleNotFoundError
from clue2geo_sdk.bundle.components import ROLES
from clue2geo_sdk.cli import main
from clue2geo_sdk.files import sha256_file


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _manifest_only(src: Path, dst: Path, edit=None) -> Path:
    """A bundle directory holding only an (edited) manifest: enough for checks that precede hashing."""
    dst.mkdir()
    m = _manifest(src)
    if edit:
        edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_demo_bundle_opens_and_verifies(demo_bundle: Path) -> None:
    b = Bundle.open(demo_bundle, verify=True)
    assert set(b.components) == {*ROLES, "selftest"}  # the demo carries its known-answer set
    assert b.demo is True
    assert set(b.extra["random_components"]) == {"vlm", "clip", "gpsclip"}
    assert not b.component("sbert").random_weights and b.component("vlm").random_weights
    for comp in b.components.values():
        for f in comp.files.values():
            path = demo_bundle / f.path
            assert path.stat().st_size == f.bytes and sha256_file(path) == f.sha256


def test_cli_verify_and_info(demo_bundle: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["bundle", "verify", str(demo_bundle)])
    assert ok.exit_code == 0, ok.output
    assert "14 files verified" in ok.output  # 11 model files, the known answers and their 2 photos
    info = runner.invoke(main, ["bundle", "info", str(demo_bundle), "--json"])
    assert info.exit_code == 0
    assert {c["role"] for c in json.loads(info.output)["components"]} == {*ROLES, "selftest"}


def _all_files(bundle: Path) -> list[str]:
    return [f["path"] for c in _manifest(bundle)["components"] for f in c["files"].values()]


@pytest.mark.parametrize("index", range(11))
def test_flipped_byte_in_any_file_fails_verify(demo_bundle: Path, index: int) -> None:
    rel = _all_files(demo_bundle)[index]
    path = demo_bundle / rel
    original = path.read_bytes()
    expected = sha256_file(path)
    pos = len(original) // 2
    try:
        path.write_bytes(original[:pos] + bytes([original[pos] ^ 0xFF]) + original[pos + 1 :])
        actual = sha256_file(path)
        with pytest.raises(BundleIntegrityError) as err:
            Bundle.open(demo_bundle, verify=True)
        assert rel in str(err.value) and expected in str(err.value) and actual in str(err.value)
        res = CliRunner().invoke(main, ["bundle", "verify", str(demo_bundle)])
        assert res.exit_code == 1 and rel in res.output
        Bundle.open(demo_bundle, verify=False)  # structure still fine without hashing
    finally:
        path.write_bytes(original)
    assert sha256_file(path) == expected


def test_missing_component_file(demo_bundle: Path, tmp_path: Path) -> None:
    b = _manifest_only(demo_bundle, tmp_path / "b")
    with pytest.raises(BundleIntegrityError, match="missing"):
        Bundle.open(b, verify=True)


@pytest.mark.parametrize("bad_path", ["../outside.onnx", "/etc/passwd", "clip/../../x.onnx"])
def test_path_escaping_the_bundle_is_refused(demo_bundle: Path, tmp_path: Path, bad_path: str) -> None:
    def edit(m: dict) -> None:
        m["components"][1]["files"]["image"]["path"] = bad_path

    b = _manifest_only(demo_bundle, tmp_path / "b", edit)
    with pytest.raises(BundleFormatError, match="escapes the bundle"):
        Bundle.open(b, verify=False)


def test_unknown_role_is_refused(demo_bundle: Path, tmp_path: Path) -> None:
    b = _manifest_only(demo_bundle, tmp_path / "b", lambda m: m["components"][0].update(role="llm"))
    with pytest.raises(BundleFormatError, match="unknown role 'llm'"):
        Bundle.open(b, verify=False)


def test_duplicate_and_missing_roles_are_refused(demo_bundle: Path, tmp_path: Path) -> None:
    b = _manifest_only(demo_bundle, tmp_path / "dup", lambda m: m["components"].append(m["components"][0]))
    with pytest.raises(BundleFormatError, match="appears twice"):
        Bundle.open(b, verify=False)
    b = _manifest_only(demo_bundle, tmp_path / "miss", lambda m: m["components"].pop(0))
    with pytest.raises(BundleFormatError, match="missing component role"):
        Bundle.open(b, verify=False)


def test_newer_major_format_is_refused_older_minor_accepted(demo_bundle: Path, tmp_path: Path) -> None:
    b = _manifest_only(demo_bundle, tmp_path / "new", lambda m: m.update(format_version="2.0"))
    with pytest.raises(BundleFormatError, match="newer than this SDK"):
        Bundle.open(b, verify=False)
    b = _manifest_only(demo_bundle, tmp_path / "minor", lambda m: m.update(format_version="1.7"))
    assert Bundle.open(b, verify=False).format_version == "1.7"


def test_not_found_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(BundleNotFoundError):
        Bundle.open(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # also a builtin
        Bundle.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleFormatError, match="not valid JSON"):
        Bundle.open(tmp_path)
    res = CliRunner().invoke(main, ["bundle", "verify", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_bundle_copy_is_independent_of_location(demo_bundle: Path, tmp_path: Path) -> None:
    """Paths are relative: a moved bundle still verifies."""
    moved = tmp_path / "moved"
    shutil.copytree(demo_bundle, moved)
    assert Bundle.open(moved, verify=True).root == moved.resolve()
