"""Safe image loading: one decoded RGB copy per input, reused by every stage.

Accepts a path, raw bytes, a PIL image or an HxWx3 uint8 array. Applies EXIF orientation, takes
the first frame of animations, flattens transparency onto white, converts CMYK / 16-bit / palette
to 8-bit RGB, and refuses inputs that are empty, not images, truncated, too large or too small,
with an :class:`ImageLoadError` that names the input and the reason.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError

MAX_PIXELS = 100_000_000  # 100 MP: above any camera; stops decompression bombs before decoding.
MIN_SIDE = 16  # smaller inputs carry no geographic information and break patching.

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray


@attrs.frozen(kw_only=True)
class LoadedImage:
    """The decoded image and where it came from; ``sha256`` is of the input bytes (or pixels)."""

    image: Image.Image = attrs.field(repr=False)
    sha256: str
    source: str

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


def _decode(data: bytes, source: str) -> Image.Image:
    if not data:
        raise ImageLoadError(f"{source}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageLoadError(
                    f"{source}: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {MAX_PIXELS / 1e6:.0f} MP pixel guard"
                )
            img.seek(0)  # first frame of an animation
            img.load()
            oriented = ImageOps.exif_transpose(img)
            return _to_rgb(oriented if oriented is not None else img)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{source}: not an image file Pillow can read") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"{source}: exceeds the pixel guard, refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{source}: cannot decode image ({exc})") from None


def load_image(obj: ImageInput | Any, *, name: str | None = None) -> LoadedImage:
    """Decode any supported input into a :class:`LoadedImage`; raise ImageLoadError on bad input."""
    if isinstance(obj, str | os.PathLike):
        path = Path(obj)
        source = name or str(path)
        if path.is_dir():
            raise ImageLoadError(f"{source}: is a directory, not an image")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageLoadError(f"{source}: no such file") from None
        except OSError as exc:
            raise ImageLoadError(f"{source}: cannot read file ({exc.strerror or exc})") from None
        img = _decode(data, source)
        digest = hashlib.sha256(data).hexdigest()
    elif isinstance(obj, bytes | bytearray | memoryview):
        data = bytes(obj)
        source = name or "<bytes>"
        img = _decode(data, source)
        digest = hashlib.sha256(data).hexdigest()
    elif isinstance(obj, Image.Image):
        source = name or "<PIL.Image>"
        if obj.size[0] * obj.size[1] > MAX_PIXELS:
            raise ImageLoadError(f"{source}: {obj.size[0]}x{obj.size[1]} exceeds the pixel guard")
        img = _to_rgb(obj)
        digest = hashlib.sha256(img.tobytes()).hexdigest()
    elif isinstance(obj, np.ndarray):
        source = name or "<numpy array>"
        if obj.ndim not in (2, 3) or (obj.ndim == 3 and obj.shape[2] not in (3, 4)):
            raise ImageLoadError(f"{source}: array of shape {obj.shape} is not HxW, HxWx3 or HxWx4")
        arr = obj if obj.dtype == np.uint8 else np.clip(obj, 0, 255).astype(np.uint8)
        img = _to_rgb(Image.fromarray(arr))
        digest = hashlib.sha256(img.tobytes()).hexdigest()
    else:
        raise ImageLoadError(
            f"unsupported image input of type {type(obj).__name__}; pass a path, bytes, PIL image or array"
        )
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise ImageLoadError(f"{source}: {w}x{h} is too small (each side must be at least {MIN_SIDE} px)")
    return LoadedImage(image=img, sha256=digest, source=source)
