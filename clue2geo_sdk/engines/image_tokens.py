"""The image-token budget of Qwen2.5-VL: one place for training and inference.

Qwen2.5-VL cuts an image into 14 px patches and merges 2x2 of them into one token, so a side must be
a multiple of 28 and an image of W'xH' costs (W'/28)(H'/28) tokens. The model's own processor
"smart-resizes" to the nearest such size within a pixel budget; resizing here, on the CPU with
Pillow, to the same size means the vision tower sees exactly what training showed it and never more
tokens than the budget, whatever the camera wrote.
"""

from __future__ import annotations

import math

from PIL import Image

FACTOR = 28  # patch 14 x spatial merge 2
IMAGE_MAX_TOKENS = 1024  # the bundle's default (vlm.params.image_max_tokens); training uses the same
IMAGE_MIN_TOKENS = 4


def smart_size(
    width: int, height: int, max_tokens: int = IMAGE_MAX_TOKENS, min_tokens: int = IMAGE_MIN_TOKENS
) -> tuple[int, int]:
    """The (width, height), multiples of 28, closest to the input's aspect within the token budget
    (Qwen2.5-VL's ``smart_resize`` rule: round, then scale down or up to fit the pixel bounds)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max_tokens < min_tokens:
        raise ValueError(f"max_tokens {max_tokens} is below min_tokens {min_tokens}")
    max_px, min_px = max_tokens * FACTOR * FACTOR, min_tokens * FACTOR * FACTOR
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > max_px:
        beta = math.sqrt(height * width / max_px)
        h = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h * w < min_px:
        beta = math.sqrt(min_px / (height * width))
        h = math.ceil(height * beta / FACTOR) * FACTOR
        w = math.ceil(width * beta / FACTOR) * FACTOR
    return w, h


def budget(engine_budget: int, asked: int = 0) -> int:
    """The image tokens a photo gets: what the caller asked for (0: nothing), never above the engine's."""
    return min(engine_budget, asked) if asked > 0 else engine_budget


def image_tokens(width: int, height: int) -> int:
    """Tokens the model spends on an image already sized to multiples of 28."""
    return (width // FACTOR) * (height // FACTOR)


def fit_image(img: Image.Image, max_tokens: int = IMAGE_MAX_TOKENS) -> Image.Image:
    """``img`` resized (bicubic) to :func:`smart_size`; returned as is when it already fits exactly."""
    size = smart_size(*img.size, max_tokens=max_tokens)
    return img if size == img.size else img.resize(size, Image.Resampling.BICUBIC)
