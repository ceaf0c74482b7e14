"""``clue2geo bundle selftest``: a bundle's known-answer set re-run on the installed tool passes as built,
and fails, each difference named, when a model file is swapped for another valid one (whether the
manifest was updated to match or the hashes were not checked)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import EXAMPLE_IMAGES
from PIL import Image

from clue2geo_sdk import Bundle, BundleFormatError, BundleIntegrityError
from clue2geo_sdk.cli import main
from clue2geo_sdk.engines.gguf_header import tensor_bytes
from clue2geo_sdk.evaluation.selftest import (
    PHOTO_WIDTH,
    ROLE,
    TOLERANCE_DEG,
    compare_records,
    read_known_answers,
    run_selftest,
    shrink,
)
from clue2geo_sdk.files import sha256_file
from clue2geo_sdk.options import Options
from clue2geo_sdk.runs.records import Record


def _linked_copy(src: Path, dst: Path) -> Path:
    """A copy of a bundle whose files are hard links: tests replace files (new inodes), never write through."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _edit_manifest(root: Path, edit) -> None:  # noqa: ANN001
    manifest = root / "manifest.json"
    doc = json.loads(manifest.read_text())
    edit(doc)
    manifest.unlink()  # a hard link: replaced, not written through
    manifest.write_text(json.dumps(doc, indent=2))


@pytest.fixture(scope="module")
def answered(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo bundle with its known-answer set: the one a fresh demo build attached, or, for a bundle
    built before the demo carried one (CLUE2GEO_TEST_BUNDLE), attached here by the same function."""
    out = _linked_copy(demo_bundle, tmp_path_factory.mktemp("selftest") / "demo")
    if ROLE not in Bundle.open(out, verify=False).components:
        from exporters.bundle_builder import attach_demo_selftest  # the export stack: only when needed

        attach_demo_selftest(out)
    return out


def _other_valid_model(src: Path, dst: Path) -> int:
    """``src`` (a GGUF) with the weights of its blocks 0 and 1 exchanged tensor by tensor, where both
    have the same size (so the same type and shape): another valid model, same header and size. The
    data offsets follow from :func:`tensor_bytes` (sizes in offset order; the data runs to the end)."""
    sizes = tensor_bytes(src)
    offset, offsets = src.stat().st_size - sum(sizes.values()), {}
    for name, n in sizes.items():
        offsets[name] = offset
        offset += n
    data = bytearray(src.read_bytes())
    swapped = 0
    for name, n in sizes.items():
        other = name.replace("blk.0.", "blk.1.", 1)
        if name.startswith("blk.0.") and sizes.get(other) == n:
            a, b = offsets[name], offsets[other]
            data[a : a + n], data[b : b + n] = data[b : b + n], data[a : a + n]
            swapped += 1
    dst.unlink(missing_ok=True)  # a hard link: replaced, not written through
    dst.write_bytes(bytes(data))
    return swapped


def test_demo_known_answer_set_is_small_and_says_what_made_it(answered: Path) -> None:
    b = Bundle.open(answered, verify=True)
    comp = b.component(ROLE)
    assert set(comp.files) == {"answers", "photo-0", "photo-1"}
    assert comp.params["models_digest"] == b.models_digest
    assert comp.params["options"] == Options(max_cue_tokens=96, max_answer_tokens=48).to_dict()
    assert comp.params["tolerance_deg"] == TOLERANCE_DEG
    photos, records = read_known_answers(b)
    # the demo's photos are two of examples/images (taken from the packages they came from), shrunk
    sources = [EXAMPLE_IMAGES / "summer_palace_beijing.jpg", EXAMPLE_IMAGES / "kauai.png"]
    for (key, path), rec, src in zip(photos, records, sources, strict=True):
        assert path.read_bytes() == shrink(src)[0], key
        with Image.open(path) as img:
            assert img.width == PHOTO_WIDTH and img.format == "JPEG"
        assert path.stat().st_size < 100_000
        assert rec["image_sha256"] == sha256_file(path) and rec["path"] == f"{ROLE}/{path.name}"
        assert Record.from_dict(rec).ok and rec["options_digest"] == Options(**comp.params["options"]).digest()


def test_selftest_passes_on_the_demo_bundle(answered: Path) -> None:
    res = CliRunner().invoke(main, ["bundle", "selftest", str(answered), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["passed"] is True and out["mismatches"] == []
    assert [p["photo"] for p in out["photos"]] == ["photo-0", "photo-1"]
    assert all(p["got"] == p["expected"] and p["got"] is not None for p in out["photos"])
    assert out["models_digest"] == out["expected_models_digest"] == Bundle.open(answered, verify=False).models_digest


def test_swapped_model_is_caught_with_and_without_the_manifest_updated(answered: Path, tmp_path: Path) -> None:
    swapped = _linked_copy(answered, tmp_path / "swapped")
    model = Bundle.open(swapped, verify=False).file("vlm", "model")
    before = sha256_file(model)
    assert _other_valid_model(model, model) >= 4
    assert (
        sha256_file(model) != before and model.stat().st_size == (answered / model.relative_to(swapped)).stat().st_size
    )

    # the hashes checked (the default): refused before any photo is run, naming the file
    res = CliRunner().invoke(main, ["bundle", "selftest", str(swapped)])
    assert res.exit_code == 1 and "is corrupt" in res.stderr and model.name in res.stderr
    with pytest.raises(BundleIntegrityError):
        run_selftest(swapped)

    # --no-verify: the models digest is the recorded one (the manifest did not change); the answers differ
    res = CliRunner().invoke(main, ["bundle", "selftest", str(swapped), "--no-verify"])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.stderr and "photo-" in res.stderr and "models:" not in res.stderr
    assert any(line.strip().startswith("photo-") and " expected " in line for line in res.stderr.splitlines())

    # the manifest updated to the new file (a re-export claiming the same validation): it verifies, and
    # the selftest names both the models digest and the answers
    def rehash(doc: dict) -> None:
        vlm = next(c for c in doc["components"] if c["role"] == "vlm")
        vlm["files"]["model"].update(sha256=sha256_file(model), bytes=model.stat().st_size)

    _edit_manifest(swapped, rehash)
    Bundle.open(swapped, verify=True)
    result = run_selftest(swapped)
    assert not result.passed
    assert result.models_digest != result.expected_models_digest
    assert result.mismatches[0].startswith("models: digest ")
    assert all(p.got is not None for p in result.photos)  # the swapped model ran and answered
    assert any(p.mismatches for p in result.photos)
    assert all(m.startswith(("models: ", "photo-0: ", "photo-1: ")) for m in result.mismatches)


def test_a_bundle_without_a_known_answer_set_is_refused_by_name(answered: Path, tmp_path: Path) -> None:
    bare = _linked_copy(answered, tmp_path / "bare")
    _edit_manifest(bare, lambda doc: doc.update(components=[c for c in doc["components"] if c["role"] != ROLE]))
    with pytest.raises(BundleFormatError, match="carries no known-answer set"):
        run_selftest(bare)
    res = CliRunner().invoke(main, ["bundle", "selftest", str(bare)])
    assert res.exit_code == 1 and "carries no known-answer set" in res.stderr

    def drop_photo(doc: dict) -> None:  # a set whose records and photos do not pair up
        for c in doc["components"]:
            c["files"].pop("photo-1", None) if c["role"] == ROLE else None

    lopsided = _linked_copy(answered, tmp_path / "lopsided")
    _edit_manifest(lopsided, drop_photo)
    with pytest.raises(BundleFormatError, match="2 record"):
        read_known_answers(Bundle.open(lopsided, verify=False))


def _rec(lat: float, lon: float, cands: list[tuple[str, float, float]], **kw: object) -> dict:
    return {
        "status": "ok",
        "image_sha256": "a" * 64,
        "options_digest": "b" * 64,
        "source": cands[0][0],
        "lat": lat,
        "lon": lon,
        "candidates": [{"source": s, "lat": a, "lon": o} for s, a, o in cands],
        "answers": [{"rank": 1, "lat": lat, "lon": lon, "sources": [cands[0][0]]}],
        **kw,
    }


def test_compare_records_within_tolerance_and_each_difference_named() -> None:
    want = _rec(40.0, 116.3, [("direct", 40.0, 116.3), ("rag5", 39.9, 116.4)])
    near = TOLERANCE_DEG / 2
    assert (
        compare_records(want, _rec(40.0 + near, 116.3 - near, [("direct", 40.0, 116.3), ("rag5", 39.9, 116.4)])) == []
    )
    moved = _rec(48.1, 11.5, [("direct", 48.1, 11.5), ("rag5", 39.9, 116.4)])
    found = compare_records(want, moved)
    assert "winner 48.100000,11.500000 expected 40.000000,116.300000" in found
    assert "candidates 1 at 48.100000,11.500000 expected 40.000000,116.300000" in found
    just_out = TOLERANCE_DEG * 2
    assert compare_records(want, _rec(40.0 + just_out, 116.3, [("direct", 40.0, 116.3), ("rag5", 39.9, 116.4)]))
    reordered = compare_records(want, _rec(40.0, 116.3, [("rag5", 39.9, 116.4), ("direct", 40.0, 116.3)]))
    assert "candidates 1 source 'rag5' expected 'direct'" in reordered
    fewer = compare_records(want, _rec(40.0, 116.3, [("direct", 40.0, 116.3)]))
    assert fewer == ["1 candidates expected 2"]
    other = _rec(40.0, 116.3, [("direct", 40.0, 116.3), ("rag5", 39.9, 116.4)], image_sha256="c" * 64)
    assert compare_records(want, other) == [f"photo sha256 {'c' * 64} expected {'a' * 64}"]
    failed = {"status": "error", "error": "VLMError", "message": "boom", "image_sha256": "a" * 64}
    said = compare_records(want, {**failed, "options_digest": "b" * 64})
    assert (
        "status error expected ok" in said
        and "failed: VLMError: boom" in said
        and "winner none expected 40.000000,116.300000" in said
    )


def test_errors_scores_and_confidences_are_compared_too() -> None:
    want = _rec(40.0, 116.3, [("direct", 40.0, 116.3)], confidence=0.9)
    want["candidates"][0]["score"] = 0.8
    want["answers"][0].update(confidence=0.9, score=0.8)
    same = json.loads(json.dumps(want))
    same["candidates"][0]["score"] += 1e-5  # float noise
    assert compare_records(want, same) == []
    weaker = json.loads(json.dumps(want))
    weaker.update(confidence=0.2)
    weaker["candidates"][0]["score"] = -0.5
    weaker["answers"][0].update(confidence=0.2)
    assert compare_records(want, weaker) == [
        "winner confidence 0.2 expected 0.9",
        "candidates 1 score -0.5 expected 0.8",
        "answers 1 confidence 0.2 expected 0.9",
    ]
    no_cues = {"status": "error", "error": "NoCuesError", "image_sha256": "a" * 64, "options_digest": "b" * 64}
    assert compare_records(no_cues, {**no_cues, "error": "EngineLoadError"}) == [
        "error EngineLoadError expected NoCuesError"
    ]


def test_a_model_file_that_cannot_be_loaded_fails_the_selftest(answered: Path, tmp_path: Path) -> None:
    broken = _linked_copy(answered, tmp_path / "broken")
    image = Bundle.open(broken, verify=False).file("clip", "image")
    image.unlink()  # a hard link: replace it, never write through it
    image.write_bytes(os.urandom(4096))
    res = CliRunner().invoke(main, ["bundle", "selftest", str(broken), "--no-verify"])
    assert res.exit_code == 1, res.output
    assert "FAILED" in res.stderr and "models: cannot be loaded: " in res.stderr
