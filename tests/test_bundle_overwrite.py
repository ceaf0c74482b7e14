"""`clue2geo bundle demo PATH` never deletes what is not a bundle's: a non-empty folder is refused unless
--overwrite is given and the folder holds only a bundle (its manifest and the files it lists)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from clue2geo_sdk import Bundle, BundleExistsError
from clue2geo_sdk.bundle import MANIFEST, ROLES, BundleWriter
from clue2geo_sdk.cli import main


def _fake_bundle(root: Path) -> list[Path]:
    """A small bundle of every role (nested folders included), written by the real writer."""
    w = BundleWriter(root, name="old", demo=True)
    files = []
    for role in ROLES:
        f = root / role / "deep" / f"{role}.bin"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(role.encode())
        w.add(role, {"f": f})
        files.append(f)
    w.write()
    return files


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"], ["--no-overwrite"]])
def test_folder_with_a_user_file_is_refused(tmp_path: Path, overwrite: list[str]) -> None:
    target = tmp_path / "thesis"
    target.mkdir()
    mine = target / "chapter1.docx"
    mine.write_text("two years of work")
    res = CliRunner().invoke(main, ["bundle", "demo", str(target), *overwrite])
    assert res.exit_code == 1, res.output
    assert "not empty" in res.stderr
    if overwrite == ["--overwrite"]:
        assert "holds no bundle" in res.stderr
    assert mine.read_text() == "two years of work" and sorted(target.iterdir()) == [mine]


def test_bundle_folder_with_a_user_file_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "b"
    files = _fake_bundle(target)
    mine = target / "clip" / "notes.txt"
    mine.write_text("keep me")
    for args in ([], ["--overwrite"]):
        res = CliRunner().invoke(main, ["bundle", "demo", str(target), *args])
        assert res.exit_code == 1, res.output
    assert "clip/notes.txt" in res.stderr and "nothing deleted" in res.stderr
    assert mine.read_text() == "keep me" and all(f.is_file() for f in files) and (target / MANIFEST).is_file()


def test_without_overwrite_a_bundle_is_kept_and_the_flag_named(tmp_path: Path) -> None:
    target = tmp_path / "b"
    _fake_bundle(target)
    with pytest.raises(BundleExistsError, match="--overwrite"):
        BundleWriter(target, name="new", demo=True)
    assert Bundle.open(target, verify=True).name == "old"


def test_overwrite_removes_only_the_listed_files_then_empty_folders(tmp_path: Path) -> None:
    target = tmp_path / "b"
    _fake_bundle(target)
    BundleWriter(target, name="new", demo=True, overwrite=True)
    assert target.is_dir() and list(target.iterdir()) == []


def test_a_manifest_pointing_outside_is_refused_and_nothing_deleted(tmp_path: Path) -> None:
    target = tmp_path / "b"
    _fake_bundle(target)
    outside = tmp_path / "precious.txt"
    outside.write_text("outside")
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["components"][0]["files"]["f"]["path"] = "../precious.txt"
    (target / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleExistsError, match="nothing deleted"):
        BundleWriter(target, name="new", demo=True, overwrite=True)
    assert outside.read_text() == "outside" and (target / MANIFEST).is_file()


@pytest.mark.slow
def test_previous_bundle_is_rebuilt_with_overwrite(demo_bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "demo"
    shutil.copytree(demo_bundle, target)
    old = Bundle.open(target, verify=False)
    old_digest = old.digest  # of the manifest file, read now
    res = CliRunner().invoke(main, ["bundle", "demo", str(target)])
    assert res.exit_code == 1 and "--overwrite" in res.stderr
    res = CliRunner().invoke(main, ["bundle", "demo", str(target), "--overwrite"])
    assert res.exit_code == 0, res.output
    new = Bundle.open(target, verify=True)
    assert new.name == "demo" and new.created > old.created and new.digest != old_digest
