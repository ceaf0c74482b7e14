"""Reference galleries from the analyst's photos, end to end on the demo bundle: geotagged JPEGs
written with Pillow's EXIF GPS IFD, ``clue2geo gallery build`` from a folder and from a CSV, resume,
a corrupt photo, a refused encoder, ``locate`` with the gallery; and ``allowed=`` restricted search
against numpy brute force on both gallery kinds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from fractions import Fraction
from pathlib import Path

import duckdb
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST
from PIL import Image
from PIL.TiffImagePlugin import IFDRational as R

from clue2geo_sdk import Geolocator
from clue2geo_sdk._native import usearch_index
from clue2geo_sdk.bundle.manifest import Bundle
from clue2geo_sdk.cli import main
from clue2geo_sdk.errors import BundleFormatError
from clue2geo_sdk.inputs.image import load_image
from clue2geo_sdk.retrieval.coordinates import CoordinateGallery
from clue2geo_sdk.retrieval.photo_build import build_gallery
from clue2geo_sdk.retrieval.photo_writer import GalleryWriter
from clue2geo_sdk.retrieval.photos import (
    DB,
    ERRORS,
    INDEX,
    INDEX2,
    VECTORS,
    PhotoGallery,
)
from clue2geo_sdk.retrieval.photos import GALLERY_MANIFEST_FILE as MANIFEST
from clue2geo_sdk.retrieval.search import (
    PHOTO_HNSW_EXPANSION,
    PHOTO_LONE_EXPANSION,
    PHOTO_TWIN_EXPANSION,
    PHOTO_TWIN_RETRY,
    IndexStore,
    int8_scale,
    to_int8,
)

# (lat, lon) of the generated photos: hemispheres of every sign.
PLACES = [(48.8584, 2.2945), (-33.8568, 151.2153), (40.6892, -74.0445), (-22.9519, -43.2105), (35.6586, 139.7454)]


def dms(value: float) -> tuple[R, R, R]:
    """Degrees, minutes, seconds (hundredths) as EXIF rationals, the way phones write them."""
    v = abs(value)
    d = int(v)
    m = int((v - d) * 60)
    s = round((v - d - m / 60) * 3600 * 100)
    return R(d, 1), R(m, 1), R(s, 100)


def exif_value(value: float) -> float:
    """The coordinate the rationals of :func:`dms` encode (what a reader must return)."""
    d, m, s = (Fraction(x.numerator, x.denominator) for x in dms(value))
    return float(d + m / 60 + s / 3600) * (1 if value >= 0 else -1)


def picture(seed: int) -> Image.Image:
    """A distinct image per seed: smooth colour fields plus blocks, 160x120."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((160, 120), Image.Resampling.BICUBIC)


def geotagged_jpeg(path: Path, lat: float, lon: float, seed: int, when: str | None = "2024:05:01 12:30:00") -> Path:
    ex = Image.Exif()
    ex[0x010F] = "TestCam"
    if when:
        ex[0x8769] = {0x9003: when, 0x9011: "+02:00"}
    ex[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    picture(seed).save(path, "JPEG", quality=92, exif=ex.tobytes())
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(gallery: Path) -> list[tuple]:
    with duckdb.connect(str(gallery / DB), read_only=True) as con:
        return con.execute(
            "SELECT key, path, sha256, lat, lon, source, taken_at, added_at FROM photos ORDER BY key"
        ).fetchall()


def errors(gallery: Path) -> list[dict]:
    return [json.loads(line) for line in (gallery / ERRORS).read_text().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    sub = folder / "trip"
    sub.mkdir()
    for i, (lat, lon) in enumerate(PLACES):
        geotagged_jpeg((sub if i % 2 else folder) / f"p{i}.jpg", lat, lon, seed=i)
    picture(99).save(folder / "no_gps.jpg", "JPEG")  # reported and skipped, not a failure
    return folder


@pytest.fixture(scope="module")
def built(photos: Path, demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gallery") / "g"
    res = CliRunner().invoke(
        main, ["gallery", "build", str(photos), "--bundle", str(demo_bundle), "--out", str(out), "--batch-size", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "5 added, 0 already in the gallery, 1 without a position, 0 failed; 5 photos" in res.output
    return out


def test_folder_build_stores_exif_positions_hashes_and_times(built: Path, photos: Path, demo_bundle: Path) -> None:
    got = rows(built)
    assert [r[0] for r in got] == list(range(5))
    by_name = {Path(r[1]).name: r for r in got}
    assert set(by_name) == {f"p{i}.jpg" for i in range(5)}
    for i, (lat, lon) in enumerate(PLACES):
        r = by_name[f"p{i}.jpg"]
        path = Path(r[1])
        assert path.is_absolute() and path.is_file()
        assert r[2] == sha256(path)
        assert r[3] == pytest.approx(exif_value(lat), abs=1e-9) and r[4] == pytest.approx(exif_value(lon), abs=1e-9)
        assert abs(r[3] - lat) < 1e-4 and abs(r[4] - lon) < 1e-4  # hundredths of a second: ~0.3 m
        assert r[5] == "exif" and r[6] == "2024-05-01T12:30:00+02:00"
    manifest = json.loads((built / MANIFEST).read_text())
    gpsclip = Bundle.open(demo_bundle, verify=False).component("gpsclip")
    assert manifest["image_tower_sha256"] == gpsclip.files["image"].sha256
    assert (manifest["kind"], manifest["count"], manifest["dim"], manifest["metric"], manifest["dtype"]) == (
        "photos",
        5,
        512,
        "cos",
        "f16",
    )
    assert (built / VECTORS).stat().st_size == 5 * 512 * 2
    no_gps = [e for e in errors(built) if e["kind"] == "no_position"]
    assert len(no_gps) == 1 and no_gps[0]["source"].endswith("no_gps.jpg")
    g = PhotoGallery(built)
    assert (len(g), g.kind, g.digest) == (5, "photos", manifest["content_sha256"])
    # The stored vectors are the image tower's embeddings of the photos, unit length.
    assert np.allclose(np.linalg.norm(g.vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_rerun_is_a_no_op(built: Path, photos: Path, demo_bundle: Path) -> None:
    before, manifest = rows(built), json.loads((built / MANIFEST).read_text())
    res = CliRunner().invoke(
        main, ["gallery", "build", str(photos), "--bundle", str(demo_bundle), "--out", str(built), "--json"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert (summary["added"], summary["already"], summary["count"]) == (0, 5, 5)
    assert rows(built) == before  # same keys, same added_at: nothing rewritten
    assert json.loads((built / MANIFEST).read_text())["content_sha256"] == manifest["content_sha256"]


def test_interrupted_build_resumes_losing_at_most_a_batch(photos: Path, demo_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "g"
    seen: list[str] = []

    def interrupt(name: str, problem: object) -> None:
        """Ctrl-C while the 2nd batch's photos are being reported (after it was committed)."""
        seen.append(name)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_gallery(photos, demo_bundle, out, batch_size=2, on_photo=interrupt)
    committed = rows(out)
    assert 1 <= len(committed) <= 4
    with pytest.raises(BundleFormatError, match="incomplete photo gallery"):
        PhotoGallery(out)  # no manifest yet
    # A torn write of the next batch: vector bytes without their rows.
    with (out / VECTORS).open("ab") as f:
        f.write(b"\x01" * 700)
    summary = build_gallery(photos, demo_bundle, out, batch_size=2)
    assert (summary.added, summary.already, summary.count) == (5 - len(committed), len(committed), 5)
    assert rows(out)[: len(committed)] == committed
    assert (out / VECTORS).stat().st_size == 5 * 512 * 2
    g = PhotoGallery(out)
    assert len(g) == 5 and len(g.index) == 5
    # The index (rebuilt from vectors.f16 after the interruption) finds each stored vector first.
    for key in range(5):
        assert g.most_similar(g.vectors[key].astype(np.float32), 1)[0].key == key


def test_corrupt_photo_is_reported_and_the_rest_land(demo_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    geotagged_jpeg(src / "a.jpg", 51.5, -0.12, seed=10)
    good = (src / "a.jpg").read_bytes()
    (src / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (src / "noise.jpg").write_bytes(b"\x00not an image at all" * 10)
    geotagged_jpeg(src / "b.jpg", 52.52, 13.40, seed=11)
    out = tmp_path / "g"
    res = CliRunner().invoke(main, ["gallery", "build", str(src), "--bundle", str(demo_bundle), "--out", str(out)])
    assert res.exit_code == 3, res.output
    assert "broken.jpg" in res.output and "noise.jpg" in res.output
    assert "2 added, 0 already in the gallery, 0 without a position, 2 failed" in res.output
    assert sorted(Path(r[1]).name for r in rows(out)) == ["a.jpg", "b.jpg"]
    failed = sorted(Path(e["source"]).name for e in errors(out) if e["kind"] == "unreadable")
    assert failed == ["broken.jpg", "noise.jpg"]
    assert len(PhotoGallery(out)) == 2


def test_csv_source_with_bad_rows(demo_bundle: Path, tmp_path: Path) -> None:
    src = tmp_path / "csvsrc"
    (src / "img").mkdir(parents=True)
    for i in range(3):  # no EXIF at all: the CSV gives the coordinates
        picture(20 + i).save(src / "img" / f"c{i}.jpg", "JPEG")
    geotagged_jpeg(src / "img" / "exif.jpg", 10.0, 10.0, seed=30)  # the CSV wins over the EXIF
    table = src / "refs.csv"
    table.write_text(
        "path,lat,lon\n"
        "img/c0.jpg,45.5,-73.5\n"
        "img/c1.jpg,95,10\n"  # line 3: latitude out of range
        "img/c2.jpg,abc,10\n"  # line 4: not a number
        f"{src / 'img' / 'c2.jpg'},-1.25,36.8\n"  # absolute path
        "img/missing.jpg,1,1\n"  # line 6: no such file
        "img/exif.jpg,-10,-20\n"
        "img/c0.jpg\n"  # line 8: too few fields
    )
    out = tmp_path / "g"
    res = CliRunner().invoke(main, ["gallery", "build", str(table), "--bundle", str(demo_bundle), "--out", str(out)])
    assert res.exit_code == 3, res.output
    got = {Path(r[1]).name: (r[3], r[4], r[5]) for r in rows(out)}
    assert got == {"c0.jpg": (45.5, -73.5, "csv"), "c2.jpg": (-1.25, 36.8, "csv"), "exif.jpg": (-10.0, -20.0, "csv")}
    bad = {e["line"]: e["message"] for e in errors(out)}
    assert set(bad) == {3, 4, 6, 8}
    assert "lat '95' is outside [-90, 90]" in bad[3] and "lat 'abc' is not a number" in bad[4]
    assert "missing.jpg" in bad[6] and "CSV line 6" in bad[6] and "expected path,lat,lon" in bad[8]
    assert f"{table}:3" in bad[3]


def test_a_gallery_of_another_image_tower_is_refused(built: Path, demo_bundle: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(built, other)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["image_tower_sha256"] = "ab" * 32
    (other / MANIFEST).write_text(json.dumps(manifest))
    ours = Bundle.open(demo_bundle, verify=False).component("gpsclip").files["image"].sha256
    with pytest.raises(BundleFormatError) as exc:
        Geolocator.load(demo_bundle, device="cpu", verify=False, gallery=other, **FAST)
    assert "ab" * 32 in str(exc.value) and ours in str(exc.value)
    # Nor can the bundle's tower add to it: two towers' embeddings would be mixed.
    with pytest.raises(BundleFormatError, match="cannot share a gallery"):
        build_gallery(tmp_path, demo_bundle, other)


def test_locate_uses_the_photo_gallery(built: Path, photos: Path, demo_bundle: Path) -> None:
    with Geolocator.load(
        demo_bundle, device="cpu", verify=False, gallery=built, nearest_neighbour_candidate=True, **FAST
    ) as geo:
        assert geo.gallery.kind == "photos" and len(geo.gallery) == 5
        target = photos / "trip" / "p1.jpg"  # Sydney
        emb = geo.gpsclip.encode_images([load_image(target).image])[0]
        hits = geo.gallery.most_similar(emb, 5)
        assert hits[0].path == str(target.resolve()) and hits[0].cosine == pytest.approx(1.0, abs=2e-3)
        assert (hits[0].lat, hits[0].lon) == pytest.approx((exif_value(PLACES[1][0]), exif_value(PLACES[1][1])))
        assert [h.cosine for h in hits] == sorted((h.cosine for h in hits), reverse=True)
        far = geo.gallery.least_similar(emb, 5)
        assert far[-1].key == hits[0].key  # the least similar list ends with the photo itself
        pred = geo.locate(target)
        nearest = [c for c in pred.candidates if c.source == "gallery_nearest"]
        assert len(nearest) == 1
        assert (nearest[0].lat, nearest[0].lon) == pytest.approx((exif_value(PLACES[1][0]), exif_value(PLACES[1][1])))


def test_locate_cli_takes_gallery(built: Path, photos: Path, demo_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    args = ["locate", str(photos / "p0.jpg"), "--bundle", str(demo_bundle), "--out", str(out), "--no-verify"]
    args += ["--gallery", str(built), "--nearest-neighbour-candidate", "--max-cue-tokens", "96"]
    res = CliRunner().invoke(main, [*args, "--max-answer-tokens", "48", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text().splitlines()[-1])
    near = [c for c in rec["candidates"] if c["source"] == "gallery_nearest"]
    assert near and (near[0]["lat"], near[0]["lon"]) == pytest.approx(
        (exif_value(PLACES[0][0]), exif_value(PLACES[0][1]))
    )


# -- allowed= ----------------------------------------------------------------------------------------


def brute(vectors: np.ndarray, q: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    v = vectors[allowed].astype(np.float64)
    cos = v @ q / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    order = np.argsort(-cos, kind="stable")[:k]
    return allowed[order], cos[order]


class ArrayGallery(IndexStore):
    """An IndexStore over an in-memory USearch index, to test the search at sizes and settings
    (exact and HNSW, brute-force subsets and oversampled ones) the demo cannot reach."""

    kind = "test"

    def __init__(self, vectors: np.ndarray, *, exact: bool, subset_limit: int) -> None:
        from clue2geo_sdk._native import usearch_index

        self.vectors = vectors.astype(np.float16)
        self.index = usearch_index().Index(ndim=vectors.shape[1], metric="cos", dtype="f16")
        self.index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=0)
        self.index.expansion_search = 256
        self.exact, self.subset_limit = exact, subset_limit
        self.lat = np.zeros(len(vectors))
        self.lon = np.zeros(len(vectors))

    def vectors_of(self, keys: np.ndarray) -> np.ndarray:
        return self.vectors[keys]

    def hit(self, key: int, cosine: float):  # noqa: ANN202
        from clue2geo_sdk.retrieval.search import GalleryHit

        return GalleryHit(key=key, lat=0.0, lon=0.0, cosine=cosine)


@pytest.mark.parametrize(("exact", "subset_limit"), [(True, 0), (True, 10**9), (False, 0), (False, 10**9)])
def test_allowed_matches_numpy_brute_force(exact: bool, subset_limit: int) -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((20, 64))
    x = (centers[rng.integers(0, 20, 4000)] + 0.6 * rng.standard_normal((4000, 64))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    g = ArrayGallery(x, exact=exact, subset_limit=subset_limit)
    stored = g.vectors.astype(np.float32)
    for trial, size in enumerate([1, 7, 15, 60, 900, 3000]):
        allowed = np.sort(rng.choice(4000, size, replace=False)).astype(np.int64)
        q = x[rng.integers(0, 4000)] + 0.3 * rng.standard_normal(64).astype(np.float32)
        for fn, sign in ((g.most_similar, 1.0), (g.least_similar, -1.0)):
            hits = fn(q, 15, allowed=allowed)
            assert set(h.key for h in hits) <= set(allowed.tolist())
            want_keys, want_cos = brute(stored, sign * q, allowed, 15)
            assert len(hits) == min(15, size)
            got = np.array([sign * h.cosine for h in hits])  # cosine to sign*q, best first
            keys = np.array([h.key for h in hits])
            truth = stored[keys] @ (sign * q) / np.linalg.norm(stored[keys], axis=1) / np.linalg.norm(q)
            assert np.allclose(got, truth, atol=2e-3) and np.all(np.diff(got) <= 1e-6), (trial, size)
            if exact or subset_limit:  # exact paths: the exact top k, up to float16 ties
                assert np.allclose(got, want_cos, atol=2e-3), (trial, size)
            else:  # HNSW, oversampled and filtered: nearly all of the exact top 15
                assert len(set(keys.tolist()) & set(want_keys.tolist())) >= min(14, size), (trial, size)
    # No restriction: the plain search; an empty restriction: nothing; keys outside: refused.
    assert len(g.most_similar(x[0], 5)) == 5 and g.most_similar(x[0], 5)[0].key == 0
    assert g.most_similar(x[0], 5, allowed=np.zeros(0, dtype=np.int64)) == []
    with pytest.raises(ValueError, match="allowed keys"):
        g.most_similar(x[0], 5, allowed=np.array([3, 4000]))


def test_photo_gallery_hnsw_mode_gives_the_exact_answer(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above EXACT_LIMIT a photo gallery searches its int8 HNSW index (vectors and query scaled
    alike) and re-scores its top PHOTO_RERANK from the float16 vectors: on a small gallery that is
    the exact answer, with float16 cosines."""
    exact = PhotoGallery(built)
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.EXACT_LIMIT", 2)
    hnsw = PhotoGallery(built)
    assert exact.exact and not hnsw.exact and str(hnsw.index.dtype).endswith("I8")
    assert hnsw.scale == pytest.approx(int8_scale(512)) == json.loads((built / MANIFEST).read_text())["index"]["scale"]
    # The index holds the scaled vectors (built from float32, so float16 rounding may move a step),
    # with far finer steps than USearch's own x127 cast.
    stored = np.asarray(hnsw.index.get(0), dtype=np.int16)
    assert np.abs(stored - to_int8(exact.vectors[0].astype(np.float32), hnsw.scale)).max() <= 1
    assert np.abs(stored).max() > 64
    assert hnsw.index.expansion_search == PHOTO_HNSW_EXPANSION
    rng = np.random.default_rng(3)
    for _ in range(5):
        q = exact.vectors[rng.integers(0, 5)].astype(np.float32) + 0.05 * rng.standard_normal(512).astype(np.float32)
        for k in (1, 3, 5):
            a, b = exact.most_similar(q, k), hnsw.most_similar(q, k)
            assert [h.key for h in a] == [h.key for h in b]
            assert np.allclose([h.cosine for h in a], [h.cosine for h in b], atol=1e-3)
            assert [h.key for h in exact.least_similar(q, k)] == [h.key for h in hnsw.least_similar(q, k)]


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors in 30 clusters, float16-exact (as vectors.f16 stores them)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, dim))
    x = centers[rng.integers(0, 30, n)] + 0.7 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)


def synthetic_rows(start: int, stop: int) -> list[dict]:
    return [
        {"path": f"{i}.jpg", "sha256": f"{i:064x}", "lat": 0.0, "lon": 0.0, "source": "csv", "taken_at": None}
        for i in range(start, stop)
    ]


def test_int8_search_path_on_a_gallery_of_thousands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 index's own search decides what is re-scored once a gallery has more rows than
    PHOTO_RERANK: the query must be scaled as the stored vectors were, and the region-filtered
    (oversampled) search must bring enough allowed candidates. Checked against numpy brute force."""
    rng = np.random.default_rng(5)
    x = clustered(3000, 64, 5)
    out = tmp_path / "g"
    out.mkdir()
    w = GalleryWriter(out, dim=64, image_sha256="test")
    for s in range(0, 3000, 500):
        w.add(synthetic_rows(s, s + 500), x[s : s + 500])
    w.finish()
    w.close()
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.EXACT_LIMIT", 100)
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.SUBSET_BRUTE_FORCE", 100)
    g = PhotoGallery(out)
    assert g.int8 and not g.exact and g.subset_limit == 100 and g.rerank < len(g)
    for i in (0, 1234, 2999):  # the query goes in as the rows went in
        assert np.abs(g.index_query(x[i]).astype(np.int16) - np.asarray(g.index.get(i), dtype=np.int16)).max() <= 1
    stored = g.vectors.astype(np.float32)
    allowed = np.sort(rng.choice(3000, 600, replace=False)).astype(np.int64)
    found, found_allowed = [], []
    for _ in range(40):
        q = x[rng.integers(0, 3000)] + 0.3 * rng.standard_normal(64).astype(np.float32)
        want, _ = brute(stored, q, np.arange(3000), 15)
        hits = g.most_similar(q, 15)
        cos = stored[[h.key for h in hits]] @ q / np.linalg.norm(q)
        assert np.allclose([h.cosine for h in hits], cos, atol=2e-3)  # re-scored: float16 cosines
        found.append(len({h.key for h in hits} & set(want.tolist())) / 15)
        want, _ = brute(stored, q, allowed, 15)
        hits = g.most_similar(q, 15, allowed=allowed)
        assert {h.key for h in hits} <= set(allowed.tolist())
        found_allowed.append(len({h.key for h in hits} & set(want.tolist())) / 15)
    assert np.mean(found) >= 0.98 and np.mean(found_allowed) >= 0.98, (np.mean(found), np.mean(found_allowed))
    # the filtered search re-scores as many candidates as the unrestricted one, not just ~2k
    seen: list[int] = []
    rescore = g.rescore
    monkeypatch.setattr(g, "rescore", lambda q, keys, d, k: seen.append(len(keys)) or rescore(q, keys, d, k))
    g.most_similar(x[7], 15, allowed=allowed)
    g.most_similar(x[7], 15)
    assert len(seen) == 2 and min(seen) >= g.rerank, seen


def test_a_second_graph_above_the_twin_threshold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past PHOTO_TWIN_ABOVE rows the writer keeps a second graph (built from vectors.f16 when the
    gallery grows past it, resumed after a kill), and the reader searches both and re-scores the
    union: a query that one graph strands is still answered by the other."""
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.PHOTO_TWIN_ABOVE", 1000)
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.EXACT_LIMIT", 100)
    x = clustered(3100, 64, 6)
    out = tmp_path / "g"
    w = GalleryWriter(out, dim=64, image_sha256="test")
    for s in range(0, 3000, 500):
        w.add(synthetic_rows(s, s + 500), x[s : s + 500])
        assert (INDEX2 in w.graphs) == (w.count > 1000), w.count
        assert len(w.graphs.get(INDEX2, w.graphs[INDEX])) == w.count
        if w.count == 1000:
            w.finish()
            assert json.loads((out / MANIFEST).read_text())["index"]["graphs"] == 1
            assert not (out / INDEX2).exists()
    w.finish()
    w.close()
    assert json.loads((out / MANIFEST).read_text())["index"]["graphs"] == 2
    g = PhotoGallery(out)
    assert g.twin is not None and len(g.twin) == len(g.index) == 3000
    assert g.index.expansion_search == g.twin.expansion_search == PHOTO_TWIN_EXPANSION
    assert [g.most_similar(x[i], 1)[0].key for i in (0, 999, 1000, 2999)] == [0, 999, 1000, 2999]
    for i in (0, 1234, 2999):  # the second graph holds the rows as the first does, queried alike
        assert np.abs(g.index_query(x[i]).astype(np.int16) - np.asarray(g.twin.get(i), dtype=np.int16)).max() <= 1

    class Stranded:
        """A graph whose search ends in the wrong place (it answers for -q, or for q rolled when
        ``roll``), always or (``narrow``) only when asked for fewer than PHOTO_TWIN_RETRY rows."""

        def __init__(self, graph: object, roll: int = 0, narrow: bool = False) -> None:
            self.graph, self.roll, self.narrow = graph, roll, narrow

        def search(self, q: np.ndarray, count: int, **kw: object) -> object:
            if self.narrow and count >= PHOTO_TWIN_RETRY:
                return self.graph.search(q, count, **kw)
            return self.graph.search(np.roll(q, self.roll) if self.roll else -q, count, **kw)

    stored = g.vectors.astype(np.float32)
    rng = np.random.default_rng(7)
    queries = [x[rng.integers(0, 3000)] + 0.3 * rng.standard_normal(64).astype(np.float32) for _ in range(20)]
    allowed = np.sort(rng.choice(3000, 600, replace=False)).astype(np.int64)
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.SUBSET_BRUTE_FORCE", 100)
    for strand in ("neither", "index", "twin", "both, apart"):
        h = PhotoGallery(out)
        if strand in ("index", "twin"):
            setattr(h, strand, Stranded(getattr(h, strand)))
        elif strand == "both, apart":  # the graphs disagree entirely: both are searched again, wider
            h.index, h.twin = Stranded(h.index, narrow=True), Stranded(h.twin, roll=7, narrow=True)
        found, found_allowed = [], []
        for q in queries:
            want, _ = brute(stored, q, np.arange(3000), 15)
            hits = h.most_similar(q, 15)
            assert len({hit.key for hit in hits}) == 15  # merged candidates: each row once
            found.append(len({hit.key for hit in hits} & set(want.tolist())) / 15)
            want, _ = brute(stored, -q, np.arange(3000), 15)
            found.append(len({hit.key for hit in h.least_similar(q, 15)} & set(want.tolist())) / 15)
            want, _ = brute(stored, q, allowed, 15)
            hits = h.most_similar(q, 15, allowed=allowed)
            found_allowed.append(len({hit.key for hit in hits} & set(want.tolist())) / 15)
        assert np.mean(found) >= 0.98 and np.mean(found_allowed) >= 0.98, (strand, found, found_allowed)
    # A second graph that a kill left behind its rows is named by the reader and resumed by the
    # next writer (the rows it holds are kept, the rest added).
    partial = usearch_index().Index(ndim=64, metric="cos", dtype="i8", connectivity=32)
    partial.add(np.arange(10, dtype=np.uint64), to_int8(x[:10], int8_scale(64)))
    partial.save(str(out / INDEX2))
    with pytest.raises(BundleFormatError, match=r"index2\.usearch.*10 vectors for 3000 rows"):
        PhotoGallery(out)
    added: list[tuple[str, int]] = []
    add_to = GalleryWriter._add_to
    monkeypatch.setattr(
        GalleryWriter, "_add_to", lambda w, name, k, v: added.append((name, int(k[0]))) or add_to(w, name, k, v)
    )
    GalleryWriter(out, dim=64, image_sha256="test").close()
    assert added == [(INDEX2, 10)]  # resumed after the 10 rows it held, not rebuilt
    g = PhotoGallery(out)
    assert len(g.twin) == 3000
    assert [g.most_similar(x[i], 1)[0].key for i in (5, 1500, 2999)] == [5, 1500, 2999]
    # A second graph a build under a lower threshold left behind is removed by the next build, and
    # a large gallery with one graph (one from before second graphs) is searched wider.
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.PHOTO_TWIN_ABOVE", 5000)
    w = GalleryWriter(out, dim=64, image_sha256="test")
    w.add(synthetic_rows(3000, 3100), x[3000:])
    w.finish()
    w.close()
    assert not (out / INDEX2).exists() and json.loads((out / MANIFEST).read_text())["index"]["graphs"] == 1
    assert PhotoGallery(out).index.expansion_search == PHOTO_HNSW_EXPANSION
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.PHOTO_TWIN_ABOVE", 1000)
    g = PhotoGallery(out)
    assert g.twin is None and g.index.expansion_search == PHOTO_LONE_EXPANSION
    assert g.most_similar(x[3050], 1)[0].key == 3050


def test_a_second_graph_is_searched_in_a_forked_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The threads that search second graphs do not survive a fork: a child process (a forking
    server, multiprocessing's default on Linux) must get its own rather than wait forever."""
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.PHOTO_TWIN_ABOVE", 100)
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.EXACT_LIMIT", 100)
    x = clustered(300, 64, 8)
    w = GalleryWriter(tmp_path / "g", dim=64, image_sha256="test")
    w.add(synthetic_rows(0, 300), x)
    w.finish()
    w.close()
    g = PhotoGallery(tmp_path / "g")
    assert g.twin is not None and g.most_similar(x[1], 1)[0].key == 1  # the parent's threads exist
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the search returns the right row
        os._exit(0 if g.most_similar(x[2], 1)[0].key == 2 else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's search did not return in 60 s")


def test_a_damaged_index_is_named_and_rebuilt_by_the_next_build(
    built: Path, photos: Path, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "g"
    shutil.copytree(built, out)
    (out / INDEX).write_bytes(b"not an index")
    with pytest.raises(BundleFormatError, match=r"index\.usearch: unreadable index"):
        PhotoGallery(out)
    summary = build_gallery(photos, demo_bundle, out)  # nothing new to add: the index is rebuilt
    assert (summary.added, summary.count) == (0, 5)
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.EXACT_LIMIT", 2)  # search the index itself
    g = PhotoGallery(out)
    assert len(g.index) == 5
    assert [g.most_similar(g.vectors[i].astype(np.float32), 1)[0].key for i in range(5)] == list(range(5))
    (out / VECTORS).write_bytes((out / VECTORS).read_bytes()[:-2])
    with pytest.raises(BundleFormatError, match=r"vectors\.f16: 4 vectors for 5 rows"):
        PhotoGallery(out)


def test_allowed_on_the_photo_and_coordinate_galleries(built: Path, demo_bundle: Path) -> None:
    g = PhotoGallery(built)
    q = g.vectors[2].astype(np.float32)
    hits = g.most_similar(q, 3, allowed=np.array([0, 4], dtype=np.int64))
    want, _ = brute(g.vectors.astype(np.float32), q, np.array([0, 4]), 3)
    assert [h.key for h in hits] == want.tolist() and all(h.path for h in hits)
    b = Bundle.open(demo_bundle, verify=False)
    p = b.params("gallery")
    coords = CoordinateGallery(
        b.file("gallery", "index"),
        b.file("metadata", "db"),
        dim=int(p["dim"]),
        encoder_sha256=str(p["encoder_sha256"]),
        location_sha256=b.component("gpsclip").files["location"].sha256,
    )
    assert coords.kind == "coordinates" and len(coords.digest) == 64
    rng = np.random.default_rng(1)
    q = rng.standard_normal(512).astype(np.float32)
    europe = np.flatnonzero((coords.lat > 35) & (coords.lat < 60) & (coords.lon > -10) & (coords.lon < 30))
    few = np.sort(rng.choice(len(coords), 40, replace=False))
    assert len(europe) > coords.subset_limit >= len(few)  # both paths: oversampled exact, and brute force
    for allowed in (europe, few):
        vecs = np.asarray(coords.index.get(allowed.astype(np.uint64)), dtype=np.float32).reshape(len(allowed), -1)
        want, want_cos = brute(vecs, q, np.arange(len(allowed)), 15)
        for fn, sign in ((coords.most_similar, 1.0), (coords.least_similar, -1.0)):
            hits = fn(q, 15, allowed=allowed)
            want, want_cos = brute(vecs, sign * q, np.arange(len(allowed)), 15)
            assert set(h.key for h in hits) <= set(allowed.tolist())
            assert np.allclose([sign * h.cosine for h in hits], want_cos, atol=2e-3)
            assert all(35 < h.lat < 60 for h in hits) or allowed is few


def test_a_gallery_with_an_older_float16_index_still_opens_and_is_reindexed_on_the_next_build(
    photos: Path, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Galleries built before the int8 index (float16 index, manifest scale 1) are searched as
    they are, and the next build rebuilds the index from vectors.f16 in the current layout."""
    out = tmp_path / "g"
    with monkeypatch.context() as m:
        m.setattr("clue2geo_sdk.retrieval.photo_writer.PHOTO_INDEX_DTYPE", "f16")
        build_gallery(photos, demo_bundle, out)
    old = json.loads((out / MANIFEST).read_text())["index"]
    assert (old["dtype"], old["scale"]) == ("f16", 1.0)
    monkeypatch.setattr("clue2geo_sdk.retrieval.photos.EXACT_LIMIT", 2)  # search the index itself
    g = PhotoGallery(out)
    assert not g.int8 and str(g.index.dtype).endswith("F16")
    assert [g.most_similar(g.vectors[i].astype(np.float32), 1)[0].key for i in range(5)] == list(range(5))
    # A build cut short after re-indexing leaves the new int8 index beside the old manifest: the
    # reader follows the index file, not the manifest.
    GalleryWriter(out, dim=512, image_sha256=json.loads((out / MANIFEST).read_text())["image_tower_sha256"]).close()
    assert json.loads((out / MANIFEST).read_text())["index"]["dtype"] == "f16"
    g = PhotoGallery(out)
    assert g.int8 and str(g.index.dtype).endswith("I8")
    assert [g.most_similar(g.vectors[i].astype(np.float32), 1)[0].key for i in range(5)] == list(range(5))
    (tmp_path / "more").mkdir()
    geotagged_jpeg(tmp_path / "more" / "extra.jpg", 10.0, 10.0, seed=99)
    summary = build_gallery(tmp_path / "more", demo_bundle, out)
    assert (summary.added, summary.count) == (1, 6)
    g = PhotoGallery(out)
    assert g.int8 and str(g.index.dtype).endswith("I8") and len(g.index) == 6
    assert [g.most_similar(g.vectors[i].astype(np.float32), 1)[0].key for i in range(6)] == list(range(6))
