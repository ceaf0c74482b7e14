"""Attaching a validation to a finished bundle: hashed by the manifest, tied to the models it measured,
and read back as the one line every report states."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_bundle_overwrite import fake_bundle

from clue2geo_sdk import Bundle, BundleFormatError, BundleIntegrityError, InputFileError
from clue2geo_sdk.bundle.attach import attach
from clue2geo_sdk.bundle.signing import generate_keypair, sign_bundle
from clue2geo_sdk.bundle.validation import NO_VALIDATION, VALIDATION_FORMAT, headline
from clue2geo_sdk.cli import main


def _report(folder: Path, models_digest: str, *, n: int = 120) -> Path:
    """A validation.json with the fields the headline reads (values chosen to check the rounding)."""
    acc = {km: {"value": v, "low": lo, "high": hi} for km, v, lo, hi in [
        ("1", 0.004, 0.0, 0.012), ("25", 0.41, 0.378, 0.444), ("200", 0.5, 0.45, 0.55),
        ("750", 0.625, 0.6, 0.66), ("2500", 0.9, 0.85, 0.95),
    ]}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "format": VALIDATION_FORMAT,
        "evalset": {"name": "set-a", "n": n},
        "bundle": {"models_digest": models_digest},
        "accuracy": acc,
    }
    (folder / "validation.json").write_text(json.dumps(data))
    (folder / "validation.html").write_text("<html><body>validation</body></html>")
    return folder


def test_models_digest_ignores_attached_roles_and_follows_the_models(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    before = Bundle.open(tmp_path / "b")
    after = attach(
        before,
        "validation",
        {"report": _report(tmp_path / "v", before.models_digest) / "validation.json"},
        params={"models_digest": before.models_digest},
    )
    assert after.digest != before.digest  # the manifest now lists the validation
    assert after.models_digest == before.models_digest
    fake_bundle(tmp_path / "other", name="other")  # other file bytes, so other models
    assert Bundle.open(tmp_path / "other").models_digest != before.models_digest


def test_headline_states_the_validation_or_its_absence(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    assert headline(b) == NO_VALIDATION == headline(None)
    b = attach(b, "validation", {"report": _report(tmp_path / "v", b.models_digest) / "validation.json"},
               params={"models_digest": b.models_digest})  # fmt: skip
    assert headline(b) == (
        "validated on set-a (n = 120): 25 km 41 % [38–44], 200 km 50 % [45–55], 750 km 62 % [60–66], "
        "2500 km 90 % [85–95] (95 % bootstrap intervals)"
    )


def test_cli_attaches_both_files_and_verify_then_covers_them(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    key, pub, _ = generate_keypair(tmp_path / "k.pem")
    sign_bundle(b.root, key, b.digest)
    report = _report(tmp_path / "v", b.models_digest)
    res = CliRunner().invoke(main, ["bundle", "attach-validation", str(b.root), str(report)])
    assert res.exit_code == 0, res.output
    assert "validated on set-a (n = 120)" in res.output and "sign it again" in res.output
    b = Bundle.open(b.root, verify=True)
    assert sorted(b.component("validation").files) == ["page", "report"]
    assert (b.root / "validation" / "1" / "validation.html").is_file()
    (b.root / "validation" / "1" / "validation.json").write_text("{}")  # an edited validation is a corrupt bundle
    with pytest.raises(BundleIntegrityError, match="validation"):
        Bundle.open(b.root, verify=True)


def test_a_validation_of_other_models_is_refused_and_the_bundle_kept(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    manifest = (tmp_path / "b" / "manifest.json").read_bytes()
    report = _report(tmp_path / "v", "ab" * 32)
    res = CliRunner().invoke(main, ["bundle", "attach-validation", str(tmp_path / "b"), str(report)])
    assert res.exit_code == 1
    assert "made with models abab" in res.output and "this bundle's models are" in res.output
    assert (tmp_path / "b" / "manifest.json").read_bytes() == manifest
    with pytest.raises(BundleFormatError, match="only validation, selftest"):
        attach(Bundle.open(tmp_path / "b"), "vlm", {}, params={})


def test_a_folder_without_a_validation_report_is_named(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "validation.json").write_text('{"format": "something else"}')
    res = CliRunner().invoke(main, ["bundle", "attach-validation", str(tmp_path / "b"), str(tmp_path / "v")])
    assert res.exit_code == 1
    assert "validation.json: not a validation report from 'clue2geo validate'" in res.output


def test_attaching_again_replaces_the_old_files(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    first = _report(tmp_path / "v1", b.models_digest)
    b = attach(b, "validation", {"report": first / "validation.json", "page": first / "validation.html"},
               params={"models_digest": b.models_digest})  # fmt: skip
    second = _report(tmp_path / "v2", b.models_digest, n=7)
    (second / "validation.json").rename(second / "v2.json")
    b = attach(b, "validation", {"report": second / "v2.json"}, params={"models_digest": b.models_digest})
    assert [p.relative_to(b.root).as_posix() for p in (b.root / "validation").rglob("*")] == [
        "validation/2",
        "validation/2/v2.json",
    ]
    assert "(n = 7)" in headline(b)


def test_a_failed_attach_leaves_the_bundle_as_it_was(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    first = _report(tmp_path / "v1", b.models_digest)
    b = attach(b, "validation", {"report": first / "validation.json"}, params={"models_digest": b.models_digest})
    manifest = (b.root / "manifest.json").read_bytes()
    with pytest.raises(InputFileError, match="validation file 'page' .*no such file"):
        attach(b, "validation", {"report": first / "validation.json", "page": tmp_path / "gone.html"},
               params={"models_digest": b.models_digest})  # fmt: skip
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "validation.json").write_text("{}")
    with pytest.raises(BundleFormatError, match="two files have the same name"):
        attach(b, "validation", {"report": first / "validation.json", "page": tmp_path / "v2" / "validation.json"},
               params={"models_digest": b.models_digest})  # fmt: skip
    assert (b.root / "manifest.json").read_bytes() == manifest
    assert Bundle.open(b.root, verify=True).digest == b.digest
    assert sorted(p.name for p in (b.root / "validation").iterdir()) == ["1"]  # nothing left of the failures
    (b.root / "manifest.json").write_bytes(manifest + b" ")
    with pytest.raises(BundleFormatError, match="changed since bundle 'old' was opened"):
        attach(b, "validation", {"report": first / "validation.json"}, params={"models_digest": b.models_digest})


def test_the_headline_says_when_the_results_were_made_under_other_options(tmp_path: Path) -> None:
    fake_bundle(tmp_path / "b")
    b = Bundle.open(tmp_path / "b")
    folder = _report(tmp_path / "v", b.models_digest)
    data = json.loads((folder / "validation.json").read_text())
    data["reproducibility"] = {"options_digest": "a" * 64}
    (folder / "validation.json").write_text(json.dumps(data))
    b = attach(b, "validation", {"report": folder / "validation.json"}, params={"models_digest": b.models_digest})
    assert headline(b, "a" * 64) == headline(b) == headline(b, None)  # the same options: nothing added
    assert headline(b, "b" * 64).endswith(
        "(95 % bootstrap intervals); measured under other options (digest aaaaaaaaaaaa…) than these results' "
        "(bbbbbbbbbbbb…)"
    )
