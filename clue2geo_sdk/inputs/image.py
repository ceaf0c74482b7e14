"""Safe image loading: one decoded RGB copy per input, reused by every stage.

Accepts a path, raw bytes, a PIL image or an HxWx3 uint8 array. Applies EXIF orientation, takes
the first frame of animations, flattens transparency onto white, converts CMYK / 16-bit / palette
to 8-bit RGB, and refuses inputs that are empty, not images, truncated, too large or too small,
with an :class:`ImageLoadError` that names the input and the reason.

Inputs are untrusted (evidence folders): Pillow picks a decoder by content, not by suffix, so a
``.jpg`` that is really EPS would reach Ghostscript. Only the :data:`ALLOWED_FORMATS` decoders are
ever run; any other format is named (from its magic bytes) and refused. Files over
:data:`MAX_FILE_BYTES` are refused from their size before a byte is read.

Memory is bounded by the pipeline's need, not the camera's pixels: an image over
:data:`WORK_MAX_PIXELS` is reduced by a power of two as it is decoded (JPEG: scaled in the DCT by
libjpeg, so the full-size pixels never exist; other formats: decoded, then reduced band by band and
the full-size buffer freed at once; one such buffer at a time in the process, however many images
are in flight). At the bundle defaults no stage uses more than about a megapixel (the VLM's image
budget, ``image_max_tokens`` x 784 px; CLIP's 3x3 patches at 224 px; GPSCLIP's 224 px; the report's
480 px thumbnail), and a reduced image keeps at least a quarter of :data:`WORK_MAX_PIXELS`. Images
at or under it (a 24 MP camera, a 12 MP phone) are decoded exactly as before. ``sha256`` is always
of the original bytes; ``LoadedImage.original_size`` says when and from what size it was reduced.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import os
import stat
import threading
from typing import Any

import attrs
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageLoadError

MAX_PIXELS = 100_000_000  # 100 MP: above any camera; stops decompression bombs before decoding.
MIN_SIDE = 16  # smaller inputs carry no geographic information and break patching.
MAX_FILE_BYTES = 200_000_000  # 200 MB: above any camera file; read at call time, so it can be changed.
#: Images with more pixels are reduced (by 2, 4, ...) while decoding, to at most this many; a
#: reduction never takes the shorter side under WORK_MIN_SIDE (a panorama keeps its height).
WORK_MAX_PIXELS = 24_000_000
WORK_MIN_SIDE = 1024
_BAND_ROWS = 256  # output rows reduced at a time (non-JPEG): bounds the temporary copies
# Formats that cannot be scaled while decoding (PNG, WebP, TIFF...) need one full-size buffer: one
# image at a time holds one, so peak memory does not grow with the images in flight.
_full_size_decode = threading.Lock()
# EXIF Orientation -> the transpose that shows the photo upright (as ImageOps.exif_transpose).
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Camera and web formats whose Pillow decoders are pure format parsers (no external programs).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "HEIF")
_heif_lock = threading.Lock()
_heif_state: list[bool] = []  # [available] once pillow-heif's opener was tried

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


@attrs.frozen(kw_only=True)
class LoadedImage:
    """The decoded image and where it came from; ``sha256`` is of the input bytes (or pixels).
    ``data`` is the file's bytes that were decoded (None for a PIL image or array input), kept so
    metadata is read from exactly what the pipeline saw (:mod:`clue2geo_sdk.inputs.metadata.photo`)."""

    image: Image.Image = attrs.field(repr=False)
    sha256: str
    source: str
    data: bytes | None = attrs.field(default=None, repr=False, eq=False)
    #: (width, height) at full size, upright, when ``image`` was reduced on loading (see
    #: :data:`WORK_MAX_PIXELS`); None when ``image`` is the full-size picture.
    original_size: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def png_bytes(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size and arr.max() > 255 else 255.0
        img = Image.fromarray((arr * (255.0 / hi)).clip(0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def heif_available() -> bool:
    """Register pillow-heif's HEIF/HEIC opener on first use (not at import: no global side effects
    until an image is decoded); False when pillow-heif is not installed."""
    with _heif_lock:
        if not _heif_state:
            try:
                from pillow_heif import register_heif_opener  # optional extra: HEIF/HEIC decoding
            except ImportError:
                _heif_state.append(False)
            else:
                register_heif_opener()
                _heif_state.append(True)
        return _heif_state[0]


def detect_format(head: bytes) -> str | None:
    """The format Pillow would pick for a file starting with ``head``, from the plugins' ``accept``
    checks on the magic bytes alone: no decoder is opened."""
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(head[:16]):
                return fmt
        except Exception:  # a plugin's check must not decide for us
            continue
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"hevc"):
        return "HEIF"
    return None


def _refuse_format(head: bytes, source: str) -> ImageLoadError:
    fmt = detect_format(head)
    if fmt is None:
        return ImageLoadError(f"{source}: not an image file Pillow can read")
    if fmt == "HEIF" and not heif_available():
        return ImageLoadError(f"{source}: HEIF/HEIC image, but pillow-heif is not installed (pip install pillow-heif)")
    if fmt in ALLOWED_FORMATS:
        return ImageLoadError(f"{source}: looks like {fmt} but cannot be decoded")
    return ImageLoadError(
        f"{source}: {fmt} file (by its content, whatever its name); refused: only {', '.join(ALLOWED_FORMATS)} "
        "images are decoded"
    )


def _release_freed_memory() -> None:
    """Hand the freed full-size buffer back to the OS. glibc keeps freed blocks of a thread's arena
    for reuse (measured: three 100 MP PNGs through ``locate`` left 2.3 GB resident where 1.6 GB was
    in use); ``malloc_trim`` returns them. A no-op where the C library has no such call."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def reduction_factor(width: int, height: int) -> int:
    """The power of two an image of ``width`` x ``height`` is reduced by on loading: 1 up to
    :data:`WORK_MAX_PIXELS`, else the smallest that brings it under, short of taking the shorter
    side below :data:`WORK_MIN_SIDE`."""
    f = 1
    while width * height > WORK_MAX_PIXELS * f * f and min(width, height) // (2 * f) >= WORK_MIN_SIDE:
        f *= 2
    return f


def _reducible(img: Image.Image) -> Image.Image:
    """``img`` in a mode Pillow's ``reduce`` averages correctly (not palette indices, not 16-bit)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return img.convert("I")
    if img.mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode == "PA":
        return img.convert("RGBA")
    if img.mode == "1":
        return img.convert("L")
    return img


def _shrink(img: Image.Image, factor: int) -> Image.Image:
    """``img`` reduced by ``factor`` (box average), a band of rows at a time, so that no full-size
    copy is made (as ``Image.reduce`` would for RGBA or a mode conversion)."""
    if factor == 1:
        return img
    w, h = img.size
    step = factor * _BAND_ROWS
    out: Image.Image | None = None
    for y in range(0, h, step):
        band = _reducible(img.crop((0, y, w, min(h, y + step)))).reduce(factor)
        if out is None:
            out = Image.new(band.mode, (-(-w // factor), -(-h // factor)))
        out.paste(band, (0, y // factor))
    assert out is not None
    return out


def _decode_reduced(img: Image.Image, factor: int) -> tuple[Image.Image, tuple[int, int]]:
    """A large image decoded at 1/``factor`` scale, upright and RGB, and its upright full size."""
    w, h = img.size
    img.draft(img.mode, (max(1, w // factor), max(1, h // factor)))  # JPEG: scaled while decoding
    rest = reduction_factor(*img.size)  # what the draft did not do (all of it for PNG etc.)
    if rest == 1:
        img.load()
        method = _ORIENT.get(img.getexif().get(0x0112))  # EXIF Orientation
        small = img
    else:
        with _full_size_decode:  # one full-size buffer at a time, however many images are in flight
            img.load()
            method = _ORIENT.get(img.getexif().get(0x0112))  # read before the full-size image goes
            small = _shrink(img, rest)
            img.close()  # frees the full-size buffer before the conversions below
            _release_freed_memory()
    rgb = _to_rgb(small)
    if method is not None:
        rgb = rgb.transpose(method)
    turned = method in (
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_270,
    )
    return rgb, ((h, w) if turned else (w, h))


def _decode(data: bytes, source: str) -> tuple[Image.Image, tuple[int, int] | None]:
    """The decoded, upright RGB image, and its full size when it was reduced (else None)."""
    if not data:
        raise ImageLoadError(f"{source}: empty file (0 bytes)")
    formats = [f for f in ALLOWED_FORMATS if f != "HEIF" or heif_available()]
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageLoadError(
                    f"{source}: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {MAX_PIXELS / 1e6:.0f} MP pixel guard"
                )
            img.seek(0)  # first frame of an animation
            factor = reduction_factor(w, h)
            if factor > 1:
                return _decode_reduced(img, factor)
            img.load()
            oriented = ImageOps.exif_transpose(img)
            return _to_rgb(oriented if oriented is not None else img), None
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise _refuse_format(data[:16], source) from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{source}: exceeds the pixel guard, refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{source}: cannot decode image ({exc})") from None


def _too_big(source: str, size: int, cap: int) -> ImageLoadError:
    return ImageLoadError(
        f"{source}: a file of {size:,} bytes exceeds the {cap:,}-byte file-size cap (max_bytes); not read"
    )


def read_image_file(path: str | os.PathLike[str], *, name: str | None = None, max_bytes: int | None = None) -> bytes:
    """A file's bytes for decoding. The size is checked from ``stat`` before any byte is read (and the
    read is bounded, should the file grow), so a huge or endless file costs no memory."""
    source = name or str(path)
    cap = MAX_FILE_BYTES if max_bytes is None else max_bytes
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageLoadError(f"{source}: is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise ImageLoadError(f"{source}: not a regular file (a device, pipe or socket)")
        if st.st_size > cap:
            raise _too_big(source, st.st_size, cap)
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except FileNotFoundError:
        raise ImageLoadError(f"{source}: no such file") from None
    except OSError as exc:
        raise ImageLoadError(f"{source}: cannot read file ({exc.strerror or exc})") from None
    if len(data) > cap:
        raise _too_big(source, len(data), cap)
    return data


def load_image(obj: ImageInput | Any, *, name: str | None = None, max_bytes: int | None = None) -> LoadedImage:
    """Decode any supported input into a :class:`LoadedImage`; raise ImageLoadError on bad input.
    ``max_bytes`` caps the file (or bytes) size; None means :data:`MAX_FILE_BYTES`."""
    cap = MAX_FILE_BYTES if max_bytes is None else max_bytes
    data: bytes | None = None
    full: tuple[int, int] | None = None
    if isinstance(obj, str | os.PathLike):
        source = name or str(obj)
        data = read_image_file(obj, name=source, max_bytes=cap)
        img, full = _decode(data, source)
        digest = hashlib.sha256(data).hexdigest()
    elif isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        source = name or "<bytes>"
        if len(data) > cap:
            raise _too_big(source, len(data), cap)
        img, full = _decode(data, source)
        digest = hashlib.sha256(data).hexdigest()
    elif isinstance(obj, Image.Image):
        source = name or "<PIL.Image>"
        if obj.size[0] * obj.size[1] > MAX_PIXELS:
            raise ImageLoadError(f"{source}: {obj.size[0]}x{obj.size[1]} exceeds the pixel guard")
        img = _to_rgb(obj)
        digest = hashlib.sha256(img.tobytes()).hexdigest()
        img, full = _shrink_in_memory(img)
    elif isinstance(obj, np.ndarray):
        source = name or "<numpy array>"
        if obj.ndim not in (2, 3) or (obj.ndim == 3 and obj.shape[2] not in (3, 4)):
            raise ImageLoadError(f"{source}: array of shape {obj.shape} is not HxW, HxWx3 or HxWx4")
        arr = obj if obj.dtype == np.uint8 else np.clip(obj, 0, 255).astype(np.uint8)
        img = _to_rgb(Image.fromarray(arr))
        digest = hashlib.sha256(img.tobytes()).hexdigest()
        img, full = _shrink_in_memory(img)
    else:
        raise ImageLoadError(
            f"unsupported image input of type {type(obj).__name__}; pass a path, bytes, PIL image or array"
        )
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageLoadError(f"{source}: {w}x{h} is too small (each side must be at least {MIN_SIDE} px)")
    return LoadedImage(image=img, sha256=digest, source=source, data=data, original_size=full)


def _shrink_in_memory(img: Image.Image) -> tuple[Image.Image, tuple[int, int] | None]:
    """An image given already decoded, reduced as a decoded file would be (the pipeline then works
    on the same size whichever way the picture came)."""
    factor = reduction_factor(*img.size)
    return (img, None) if factor == 1 else (_shrink(img, factor), img.size)
