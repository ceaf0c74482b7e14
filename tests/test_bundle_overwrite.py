"""`clue2geo bundle demo PATH` never deletes what is not a bundle's: a non-empty folder is refused unless
--overwrite is given and the folder holds only a bundle (its manifest and the files it lists)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from clue2geo_sdk import Bundle, BundleExistsError
from clue2geo_sdk.bundle.components import ROLES
from clue2geo_sdk.bundle.manifest import MANIFEST_FILE as MANIFEST
from clue2geo_sdk.bundle.writer import BundleWriter
from clue2geo_sdk.cli import main

# the smallest parameters the manifest schema accepts for each role, and the files the runtime opens
_MEAN_STD = {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
FAKE_PARAMS = {
    "vlm": {},
    "clip": {**_MEAN_STD, "embed_dim": 8},
    "gpsclip": {**_MEAN_STD, "dim": 8},
    "sbert": {"dim": 8},
    "gallery": {"dim": 8, "encoder_sha256": "0" * 64},
    "metadata": {},
}
FAKE_FILES = {
    "vlm": ("model", "mmproj"),
    "clip": ("image", "text", "tokenizer"),
    "gpsclip": ("image", "location"),
    "sbert": ("model", "tokenizer"),
    "gallery": ("index",),
    "metadata": ("db",),
}


def fake_bundle(root: Path, *, name: str = "old", overwrite: bool = False) -> list[Path]:
    """A small bundle of every role (nested folders included), written by the real writer; returns
    where its files are once it is in place."""
    w = BundleWriter(root, name=name, demo=True, overwrite=overwrite)
    rels = []
    for role in ROLES:
        files = {}
        for key in FAKE_FILES[role]:
            f = w.root / role / "deep" / f"{key}.bin"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(f"{name} {role} {key}".encode())
            files[key] = f
            rels.append(f.relative_to(w.root))
        w.add(role, files, params=FAKE_PARAMS[role])
    w.write()
    return [root / rel for rel in rels]


_fake_bundle = fake_bundle


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


def test_overwrite_replaces_the_old_bundle_only_once_the_new_one_is_written(tmp_path: Path) -> None:
    target = tmp_path / "b"
    old_files = _fake_bundle(target)
    w = BundleWriter(target, name="new", demo=True, overwrite=True)
    assert Bundle.open(target, verify=True).name == "old"  # nothing is deleted before the new bundle is complete
    w.abort()
    assert Bundle.open(target, verify=True).name == "old" and all(f.is_file() for f in old_files)
    new_files = _fake_bundle(target, name="new", overwrite=True)
    assert Bundle.open(target, verify=True).name == "new"
    on_disk = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert on_disk == sorted([MANIFEST] + [f.relative_to(target).as_posix() for f in new_files])
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no build or old-bundle folder left beside it


def test_a_manifest_pointing_outside_is_refused_and_nothing_deleted(tmp_path: Path) -> None:
    target = tmp_path / "b"
    _fake_bundle(target)
    outside = tmp_path / "precious.txt"
    outside.write_text("outside")
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["components"][0]["files"]["model"]["path"] = "../precious.txt"
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
