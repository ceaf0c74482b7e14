"""The case report, end to end: real ``locate`` runs on the demo bundle, the report written by the CLI,
then rendered in a real headless Chromium (the OS package): the screenshot must show the world map and
the photo with its matched patch outlined where the layout puts them, the DOM must hold one section per
record, a missing or changed photo must be said, model strings must stay text, and printing to PDF
must give one page per image.

Chromium is required, not optional: without /usr/bin/chromium these tests fail (``.ci/run`` and the
README's test command install it first)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import EXAMPLE_IMAGES, FAST
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from clue2geo_sdk.cli import main
from clue2geo_sdk.engines.encoders import patch_grid
from clue2geo_sdk.evidence.report.figures import CUE_COLORS, LAND, OCEAN, THUMB_MAX, patch_box
from clue2geo_sdk.evidence.report.render import render_report
from clue2geo_sdk.inputs.image import load_image

CHROMIUM = Path(os.environ.get("CLUE2GEO_CHROMIUM", "/usr/bin/chromium"))
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
QUICK = ["--no-verify", "--device", "cpu", *(f"--{k.replace('_', '-')}={v}" for k, v in FAST.items())]
SUMMER_PALACE = (39.9999, 116.2755)  # written into a.jpg's EXIF GPS


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def chromium(tmp: Path, *args: str, page: Path) -> subprocess.CompletedProcess[str]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the case report is checked in a real browser. Install it with "
            "'apt-get install -y --no-install-recommends chromium' (as .ci/run and the README's test command do)"
        )
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


class _Dom(HTMLParser):
    """The elements of a DOM dump: (tag, attributes) in document order, and its text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str | None = None, **attrs: str) -> list[dict[str, str | None]]:
        return [
            a
            for t, a in self.elements
            if (tag is None or t == tag) and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


def _with_gps(src: Path, dest: Path) -> None:
    """The photo with a library-written EXIF GPS IFD (degrees, minutes, seconds as rationals)."""

    def dms(value: float) -> tuple[IFDRational, ...]:
        d = int(value)
        m = int((value - d) * 60)
        s = round(((value - d) * 60 - m) * 60 * 100)
        return IFDRational(d, 1), IFDRational(m, 1), IFDRational(s, 100)

    lat, lon = SUMMER_PALACE
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "TestCam", "Model 1"
    exif[0x8825] = {1: "N", 2: dms(lat), 3: "E", 4: dms(lon)}
    with Image.open(src) as im:
        im.save(dest, quality=92, exif=exif.tobytes())


def _rotated(src: Path, dest: Path) -> None:
    """The photo's pixels stored as they are, with EXIF Orientation 6 (display rotated 90 degrees)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(src) as im:
        im.save(dest, quality=92, exif=exif.tobytes())


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def case(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real ``locate`` runs: a.jpg (EXIF GPS) with ``--report``, then a rotated photo, two photos that
    are later deleted / changed, and a path that never existed; then ``clue2geo report``."""
    tmp = tmp_path_factory.mktemp("case")
    photo = EXAMPLE_IMAGES / "summer_palace_beijing.jpg"
    imgs = tmp / "imgs"
    imgs.mkdir()
    _with_gps(photo, imgs / "a.jpg")
    _rotated(photo, imgs / "rot.jpg")
    shutil.copy(photo, imgs / "gone.jpg")
    shutil.copy(EXAMPLE_IMAGES / "kauai.png", imgs / "changed.png")
    out = tmp / "results.jsonl"
    runner = CliRunner()
    first = runner.invoke(
        main,
        [
            "locate",
            str(imgs / "a.jpg"),
            "--bundle",
            str(demo_bundle),
            "--out",
            str(out),
            "--report",
            str(tmp / "a.html"),
            *QUICK,
        ],
    )
    assert first.exit_code == 0, first.output
    rest = [imgs / n for n in ("rot.jpg", "gone.jpg", "changed.png", "never.jpg")]
    args = ["locate", *map(str, rest), "--bundle", str(demo_bundle), "--out", str(out), "--resume", *QUICK]
    second = runner.invoke(main, args)  # --resume: appended, the hash chain continues
    assert second.exit_code == 3, second.output  # never.jpg failed
    (imgs / "gone.jpg").unlink()
    with (imgs / "changed.png").open("ab") as fh:  # still a valid PNG, but not the bytes that were located
        fh.write(b"\0")
    report = tmp / "case.html"
    res = runner.invoke(main, ["report", str(out), "--bundle", str(demo_bundle), "--out", str(report)])
    assert res.exit_code == 0, res.output
    recs = {Path(r["path"]).name: r for r in _records(out)}
    return {"tmp": tmp, "imgs": imgs, "out": out, "report": report, "records": recs, "photo": photo}


def test_patch_box_cuts_like_the_encoder() -> None:
    # hand-computed: 10x7 in 3x3, patch 4 (row 1, col 1) -> x 10//3=3..20//3=6, y 7//3=2..14//3=4
    assert patch_box((10, 7), (3, 3), 4) == (3, 2, 6, 4)
    assert patch_box((10, 7), (3, 3), 8) == (6, 4, 10, 7)
    img = Image.new("RGB", (641, 427))
    for grid in ((3, 3), (2, 4), (5, 1)):
        boxes = [box for _, box in patch_grid(img, *grid)]
        assert [patch_box(img.size, grid, i) for i in range(len(boxes))] == boxes
    with pytest.raises(ValueError, match="outside a 3x3 grid"):
        patch_box((10, 7), (3, 3), 9)


def test_report_renders_in_chromium(case: dict[str, Any]) -> None:
    tmp, report, recs = case["tmp"], case["report"], case["records"]
    assert (tmp / "a.html").stat().st_size > 10_000  # locate --report wrote one too
    rec = recs["a.jpg"]
    assert rec["status"] == "ok" and rec["metadata"]["position"] is not None and rec["metadata_distance_km"] > 0

    # the DOM: one section per record, in journal order, with what each must say
    dom = _Dom(chromium(tmp, "--dump-dom", page=report).stdout)
    sections = dom.find("section")
    assert [s["id"] for s in sections] == [f"image-{n}" for n in range(1, 6)]
    by_name = {Path(r["path"]).name: n for n, r in enumerate(_records(case["out"]), start=1)}
    status = {name: sections[n - 1] for name, n in by_name.items()}
    assert status["a.jpg"]["data-thumb"] == "ok" and status["rot.jpg"]["data-thumb"] == "ok"
    assert status["gone.jpg"]["data-thumb"] == "missing" and status["changed.png"]["data-thumb"] == "mismatch"
    assert status["never.jpg"]["data-status"] == "error"
    text = " ".join(" ".join(dom.text).split())
    assert "the image file is missing at report time" in text
    assert "has changed since it was located" in text and recs["changed.png"]["image_sha256"] in text
    assert recs["never.jpg"]["message"] in text  # the failure, with its error
    assert text.count("clue2geo audit verify") == 5 and "hash chain intact" in text
    assert rec["record_hash"] in text and rec["prev_hash"] in text and rec["started_utc"] in text
    assert "demo bundle" in text and dom.find(id="demo-warning")
    assert len(dom.find("details", **{"class": "raw"})) == 4  # raw answers folded away, per located image
    assert len(dom.find("table", **{"class": "answers"})) == 4  # the ranked answers with their confidence
    first = f"{rec['answers'][0]['confidence']:.3f}"
    assert rec["answers"][0]["members"] and first in text
    # exactly two photos embedded (a.jpg and rot.jpg), and nothing else is fetched from anywhere
    images = dom.find("image")
    assert len(images) == 2 and all(str(i["href"]).startswith("data:image/jpeg;base64,") for i in images)
    for _, attrs in dom.elements:
        for key in ("src", "href"):
            assert attrs.get(key) is None or str(attrs[key]).startswith(("data:", "#")), attrs
    # the rotated photo is shown as the pipeline saw it: EXIF-transposed (portrait)
    photos = dom.find("svg", **{"class": "photo"})
    sizes = [tuple(map(int, str(p["viewbox"]).split()[2:])) for p in photos]
    assert sizes[0][0] > sizes[0][1] and sizes[1][0] < sizes[1][1] and max(sizes[1]) == THUMB_MAX
    assert len(dom.find("rect", **{"class": "metadata-position"})) == 2  # overview and a.jpg's own map

    # the screenshot: the page rendered, with the map and the outlined photo patch where they belong
    png = tmp / "shot.png"
    chromium(tmp, f"--screenshot={png}", "--window-size=1280,2000", "--hide-scrollbars", page=report)
    px = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert px.shape == (2000, 1280, 3) and px.std() > 20
    land = (px == _rgb(LAND)).all(axis=2)
    ocean = (px == _rgb(OCEAN)).all(axis=2)
    ys, xs = np.nonzero(land[:1000])  # the overview map is above the first image
    assert land.sum() > 50_000 and ocean.sum() > 100_000
    assert xs.max() - xs.min() > 0.6 * 1280 and ys.max() - ys.min() > 250  # the continents span the page
    embedded = [_decode_data_uri(str(i["href"])) for i in images]
    _check_outlined_patch(px, rec, case["imgs"] / "a.jpg", embedded[0])
    # the rotated photo's thumbnail is its pixels as the pipeline decoded them (transposed), not the file's
    rot = load_image(case["imgs"] / "rot.jpg").image
    assert Image.open(case["imgs"] / "rot.jpg").size == rot.size[::-1]
    want = np.asarray(rot.resize(embedded[1].shape[1::-1])).astype(int)
    assert embedded[1].shape == want.shape and np.abs(embedded[1] - want).mean() < 6

    # printing: one image per page after the overview
    pdf = tmp / "case.pdf"
    chromium(tmp, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", page=report)
    data = pdf.read_bytes()
    pages = len(re.findall(rb"/Type\s*/Page\b(?!s)", data))
    assert data.startswith(b"%PDF") and pages >= 1 + len(sections), pages


def _decode_data_uri(uri: str) -> np.ndarray:
    head, _, body = uri.partition(",")
    assert head == "data:image/jpeg;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body))).convert("RGB")).astype(int)


def _check_outlined_patch(px: np.ndarray, rec: dict[str, Any], image: Path, embedded: np.ndarray) -> None:
    """Clue set 1's outline is drawn in its colour around the patch its primary cue matched: inside
    it, the screenshot shows the embedded thumbnail's pixels at that patch, and the thumbnail is the
    photo as the pipeline decoded it."""
    color = np.array(_rgb(CUE_COLORS[0]))
    mask = (px == color).all(axis=2)
    rows, cols = np.nonzero(mask.sum(axis=1) >= 40)[0], np.nonzero(mask.sum(axis=0) >= 40)[0]
    assert rows.size and cols.size, "no patch outline in the screenshot"
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    assert bottom - top > 40 and right - left > 40
    primary = rec["cues"][rec["cluemap"]["sets"][0]["primary"]]
    loaded = load_image(image)
    w, h = loaded.size
    scale = min(1.0, THUMB_MAX / max(w, h))
    tw, th = round(w * scale), round(h * scale)
    thumb = np.asarray(loaded.image.resize((tw, th))).astype(int)
    assert embedded.shape == thumb.shape and np.abs(embedded - thumb).mean() < 6  # JPEG-encoded, same photo
    thumb = embedded
    pl, pt, pr, pb = patch_box((w, h), (3, 3), primary["patch"])
    sx, sy = tw / w, th / h
    # the outline's outer edge is 1.5 px (inset) - 1.5 px (half the stroke) from the patch box: on it
    assert abs((right - left) - ((pr - pl) * sx - 1)) <= 3 and abs((bottom - top) - ((pb - pt) * sy - 1)) <= 3
    ox, oy = left - round(pl * sx), top - round(pt * sy)  # where the thumbnail's origin is on screen
    m = 14  # clear of the stroke, the grid and nested outlines; 26 at the top for the set's number
    screen = px[top + 26 : bottom - m, left + m : right - m]
    assert screen.std() > 5  # a photo, not a flat fill
    diffs = {}
    for dx in range(-2, 3):  # the stroke's anti-aliased edge may hide a pixel: allow for it
        for dy in range(-2, 3):
            y0, x0 = top + 26 - oy + dy, left + m - ox + dx
            expect = thumb[y0 : y0 + screen.shape[0], x0 : x0 + screen.shape[1]]
            if expect.shape == screen.shape:
                diffs[dx, dy] = float(np.abs(screen - expect).mean())
    assert diffs and min(diffs.values()) < 8, diffs  # JPEG decoders and filtering differ a little
    # another patch of the photo does not match (the check can fail)
    other = (primary["patch"] + 4) % 9
    ol, ot, _, _ = patch_box((w, h), (3, 3), other)
    y0, x0 = round(ot * sy) + 26, round(ol * sx) + m
    elsewhere = thumb[y0 : y0 + screen.shape[0], x0 : x0 + screen.shape[1]]
    if elsewhere.shape == screen.shape:
        assert float(np.abs(screen - elsewhere).mean()) > 2 * min(diffs.values())


def test_model_strings_cannot_inject_markup(case: dict[str, Any]) -> None:
    rec = json.loads(json.dumps(case["records"]["a.jpg"]))
    evil = '<script>document.title="pwned"</script><img id="injected" src="x" onerror="document.title=1">'
    rec["cues"][0]["cue"] = evil
    rec["model_country"] = '"><b id="injected2">x</b>'
    rec["raw_outputs"] = {"direct": [{"text": '</pre></details><svg id="injected3" onload="alert(1)">'}]}
    rec["candidates"] = [
        {"source": "direct", "lat": 1.0, "lon": 2.0, "score": 0.1, "country": None, "city": None, "sample": 0}
        | {"landmark": "<iframe id=injected4 src=//example.com></iframe>"}
    ]
    page = case["tmp"] / "evil.html"
    page.write_text(render_report([rec], image_root=None), encoding="utf-8")
    dom = _Dom(chromium(case["tmp"], "--dump-dom", page=page).stdout)
    tags = {t for t, _ in dom.elements}
    assert "script" not in tags and "iframe" not in tags and "img" not in tags
    assert not [a for _, a in dom.elements if str(a.get("id") or "").startswith("injected")]
    text = "".join(dom.text)
    assert evil in text and '"><b id="injected2">x</b>' in text  # shown as text, whole
    assert "<title>clue2geo case report</title>" in chromium(case["tmp"], "--dump-dom", page=page).stdout


def test_edited_record_is_flagged(case: dict[str, Any]) -> None:
    lines = case["out"].read_text(encoding="utf-8").splitlines()
    rec = json.loads(lines[0])
    rec["lat"] = 48.8566  # moved to Paris by hand, hashes left as they were
    edited = case["tmp"] / "edited.jsonl"
    edited.write_text("\n".join([json.dumps(rec), *lines[1:]]) + "\n", encoding="utf-8")
    out = case["tmp"] / "edited.html"
    res = CliRunner().invoke(main, ["report", str(edited), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text(encoding="utf-8")
    assert "FAILED: " in text and ":1: record_hash does not match" in text
    assert text.count("DOES NOT MATCH: this record was edited") == 1
    assert "3x3 assumed (no bundle given)" in text
