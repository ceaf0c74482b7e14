"""open_clip model -> ONNX image tower + ONNX text tower + ``tokenizer.json`` for the runtime.

The tokenizer is open_clip's own BPE (``bpe_simple_vocab_16e6.txt.gz``) turned into a Hugging Face
fast tokenizer, so the runtime tokenizes with ``tokenizers`` alone; ids are checked against
open_clip's tokenizer on sample texts.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import bytes_to_unicode, default_bpe, tokenize
from tokenizers import Tokenizer

from clue2geo_sdk.errors import ExportValidationError

from ._onnx import EXTERNAL_DATA_ABOVE, export_module, fp16_variants, onnx_files, run_onnx
from ._validate import check_close

CONTEXT_LENGTH = 77
SAMPLE_TEXTS = (
    "a photo of a red double-decker bus on a london street",
    "Tower structure, a tall tower with a complex metal framework",
    "Shop sign: 'Boulangerie Patisserie' in French, white letters",
    "snow-capped mountains behind a wooden chalet",
    "",
)


def tiny_open_clip(seed: int = 0):  # -> open_clip.CLIP
    """A small open_clip CLIP (ViT, 2+2 layers, width 64) with the real 49408-token vocabulary."""
    torch.manual_seed(seed)
    vision = CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=32, image_size=224)
    text = CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2)
    return CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).eval()


def write_clip_tokenizer(out: Path) -> Path:
    """Build ``tokenizer.json`` from open_clip's BPE merges (truncation/padding to 77 built in)."""
    from transformers import CLIPTokenizerFast  # export extra, heavy: loaded only to build the tokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizerFast(vocab_file=str(Path(tmp) / "vocab.json"), merges_file=str(Path(tmp) / "merges.txt"))
    backend = tok.backend_tokenizer
    backend.enable_truncation(CONTEXT_LENGTH)
    backend.enable_padding(length=CONTEXT_LENGTH, pad_id=0, pad_token="!")
    backend.save(str(out))
    return out


def check_tokenizer(path: Path) -> None:
    """The runtime tokenizer must give open_clip's ids exactly on the sample texts."""
    ref = tokenize(list(SAMPLE_TEXTS), context_length=CONTEXT_LENGTH).numpy()
    got = np.array([e.ids for e in Tokenizer.from_file(str(path)).encode_batch(list(SAMPLE_TEXTS))])
    if ref.shape != got.shape or not np.array_equal(ref, got):
        bad = int(np.argmax((ref != got).any(axis=1))) if ref.shape == got.shape else 0
        raise ExportValidationError(f"CLIP tokenizer.json disagrees with open_clip on {SAMPLE_TEXTS[bad]!r}")


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)


def _clip_params(model: Any, size: int, embed_dim: int) -> dict[str, Any]:
    """What the runtime's CLIP encoder reads: preprocessing (the model's own mean/std, else OpenAI's),
    context length, embedding width and the cluemap's patch grid."""
    mean = getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD
    return {
        "image_size": size,
        "mean": list(mean),
        "std": list(std),
        "resize": "shortest_side_bicubic_center_crop",
        "context_length": CONTEXT_LENGTH,
        "embed_dim": embed_dim,
        "patch_grid": [3, 3],
    }


def export_clip(
    model,
    out_dir: str | Path,
    *,
    atol: float = 1e-4,
    seed: int = 0,
    fp16: bool = False,
    external_data_above: int = EXTERNAL_DATA_ABOVE,
) -> dict[str, Any]:
    """Export both towers and the tokenizer; check each tower against torch on the same inputs.

    A tower past ``external_data_above`` bytes of weights (ViT-H/14's image tower: 2.5 GB) is written
    as graph + ``.data`` file, both listed in ``files``. With ``fp16``, float16 copies of the towers are
    added (``image_fp16``, ``text_fp16``) where they pass parity; ``params["fp16"]`` records each verdict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else int(size)
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, size, size, generator=gen)
    tok_path = write_clip_tokenizer(out_dir / "tokenizer.json")
    check_tokenizer(tok_path)
    ids = torch.tensor([e.ids for e in Tokenizer.from_file(str(tok_path)).encode_batch(list(SAMPLE_TEXTS))])
    with torch.no_grad():
        ref_img = model.encode_image(pixels).numpy()
        ref_txt = model.encode_text(ids).numpy()
    img_path = export_module(
        _ImageTower(model),
        (pixels,),
        out_dir / "image.onnx",
        input_names=["pixel_values"],
        output_names=["image_embeds"],
        external_data_above=external_data_above,
    )
    img_feeds = {"pixel_values": pixels.numpy()}
    d_img = check_close("CLIP image tower", ref_img, run_onnx(img_path, img_feeds)[0], atol=atol)
    txt_path = export_module(
        _TextTower(model),
        (ids,),
        out_dir / "text.onnx",
        input_names=["input_ids"],
        output_names=["text_embeds"],
        external_data_above=external_data_above,
    )
    txt_feeds = {"input_ids": ids.numpy()}
    d_txt = check_close("CLIP text tower", ref_txt, run_onnx(txt_path, txt_feeds)[0], atol=atol)
    files: dict[str, Path] = {**onnx_files("image", img_path), **onnx_files("text", txt_path), "tokenizer": tok_path}
    params = _clip_params(model, size, int(ref_img.shape[1]))
    if fp16:
        towers = {"image": (img_path, img_feeds, ref_img), "text": (txt_path, txt_feeds, ref_txt)}
        params["fp16"] = fp16_variants(out_dir, towers, files, external_data_above=external_data_above)
    return {
        "files": files,
        "params": params,
        "parity": {"image_max_abs_diff": d_img, "text_max_abs_diff": d_txt, "atol": atol},
    }
