"""Every awkward input either loads correctly or fails with a clear error naming it."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clue2geo_sdk import ImageLoadError
from clue2geo_sdk.inputs.image import load_image


def make_bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """Write the awkward files; return {file name: expected reason fragment} for those that must fail."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "notes.jpg").write_text("this is a text file, not a photo\n")
    (folder / "huge.png").write_bytes(png_claiming(20000, 20000))
    Image.new("RGB", (1, 1), (1, 2, 3)).save(folder / "tiny.png")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "cannot decode",
        "notes.jpg": "not an image",
        "huge.png": "pixel guard",
        "tiny.png": "too small",
    }


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height (a decompression-bomb shape)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_files_fail_with_named_reasons(tmp_path: Path, photo: Path) -> None:
    expected = make_bad_inputs(tmp_path, photo)
    for name, reason in expected.items():
        with pytest.raises(ImageLoadError) as err:
            load_image(tmp_path / name)
        assert name in str(err.value) and reason in str(err.value)


def test_missing_path_directory_and_broken_link(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageLoadError, match="dangling.jpg"):
        load_image(tmp_path / "dangling.jpg")
    with pytest.raises(ImageLoadError, match="unsupported image input"):
        load_image(3.14)  # type: ignore[arg-type]


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    img = load_image(tmp_path / "cmyk.jpg").image
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_scaled_to_8_bit(tmp_path: Path) -> None:
    arr = np.full((32, 32), 65535, dtype=np.uint16)
    arr[:16] = 0
    Image.fromarray(arr).save(tmp_path / "deep.png")
    img = load_image(tmp_path / "deep.png").image
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (0, 0, 0) and img.getpixel((0, 31)) == (255, 255, 255)


def test_palette_png_with_transparency_is_flattened_on_white(tmp_path: Path) -> None:
    p = Image.new("P", (20, 20), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 10, 20))
    p.info["transparency"] = 0
    p.save(tmp_path / "pal.png", transparency=0)
    img = load_image(tmp_path / "pal.png").image
    assert img.getpixel((2, 2)) == (255, 0, 0) and img.getpixel((15, 2)) == (255, 255, 255)


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = load_image(tmp_path / "anim.gif").image.getpixel((5, 5))
    assert r > 200 and b < 60


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (60, 30), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (30, 60)


def test_other_input_kinds_and_digest(photo: Path) -> None:
    from_path = load_image(photo)
    from_bytes = load_image(photo.read_bytes())
    assert from_path.sha256 == from_bytes.sha256  # digest of the file's bytes
    arr = np.asarray(from_path.image)
    assert load_image(arr).size == from_path.size
    assert load_image(from_path.image).size == from_path.size
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((4, 4, 7), dtype=np.uint8))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nnewpath 0 0 moveto 32 32 lineto stroke\nshowpage\n"


def test_eps_named_jpg_is_refused_without_running_its_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    def reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the EPS decoder (Ghostscript's way in) was reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", reached)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", reached)
    (tmp_path / "evidence.jpg").write_bytes(EPS)
    with pytest.raises(ImageLoadError, match=r"evidence\.jpg: EPS file .*refused"):
        load_image(tmp_path / "evidence.jpg")
    with pytest.raises(ImageLoadError, match="EPS"):
        load_image(EPS + b"\n" * 100)


def test_other_pillow_formats_are_named_and_refused(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "icon.png", format="ICO")
    with pytest.raises(ImageLoadError, match=r"icon\.png: ICO file"):
        load_image(tmp_path / "icon.png")


def test_heic_from_pillow_heif_loads(tmp_path: Path) -> None:
    import pillow_heif

    pillow_heif.from_pillow(Image.new("RGB", (64, 48), (10, 200, 30))).save(tmp_path / "phone.heic", quality=95)
    img = load_image(tmp_path / "phone.heic").image
    r, g, b = img.getpixel((32, 24))
    assert img.size == (64, 48) and g > 150 and r < 80 and b < 80
    from clue2geo_sdk.inputs.discover import discover

    assert [p.name for p in discover([tmp_path], recursive=False)] == ["phone.heic"]  # type: ignore[union-attr]


def test_oversized_file_is_refused_before_it_is_read(
    tmp_path: Path, photo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clue2geo_sdk.inputs.image as image_mod
    from clue2geo_sdk.inputs.discover import read_input_bytes

    opened: list[object] = []
    real_open = open
    monkeypatch.setattr(image_mod, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k), raising=False)
    monkeypatch.setattr(image_mod, "MAX_FILE_BYTES", 1000)
    assert photo.stat().st_size > 1000
    with pytest.raises(
        ImageLoadError, match=r"summer_palace_beijing\.jpg: a file of [\d,]+ bytes exceeds the 1,000-byte file-size cap"
    ):
        load_image(photo)
    with pytest.raises(ImageLoadError, match="file-size cap"):
        load_image(photo.read_bytes())
    assert read_input_bytes(photo) is None  # the batch neither hashes nor holds it
    assert opened == []  # refused from stat, before a byte was read
    assert load_image(photo, max_bytes=photo.stat().st_size).size[0] > 0  # the cap is the caller's to set
    assert len(opened) == 1
