"""How many images fit in flight on one GPU at Qwen2.5-VL-7B Q4_K_M (issue 22, item 4), by arithmetic.

    python bench/kv_capacity.py [--gguf model-q4_k_m.gguf --mmproj mmproj-f16.gguf] [--gpu-gib 80] [--json]

KV per token (f16) = 2 (K and V) x layers x KV heads x head dim x 2 bytes. An image has 6 sequences: its
prefix (chat header text + image tokens) and its 5 prompts, each the prefix + a suffix + an answer. Three
ways to size an image's KV cells:

- shared: sized to need in a unified cache, where the prefix is stored once and the prompts' sequences
  point at it (``llama_memory_seq_cp`` only updates metadata): prefix + suffixes + budgets;
- per sequence: sized to need with one KV stream per sequence (``kv_unified=False``, what the engines
  use so that batching never changes a token: docs/engine.md), the prefix copied into each of the 6;
- n_ctx per sequence: what is reserved today (clue2geo_sdk/engines/memory.py): n_ctx cells x 6.

Fixed memory: the Q4_K_M text weights and the f16 mmproj (file sizes when given, else the published
files' sizes), and ESTIMATES, said so in the output: llama.cpp's compute buffers (the allowance
memory.py fits: one micro-batch's logits or attention scores + an output row per sequence, counted
against each row's free memory), the vision tower's graph for one image, the ONNX encoders on CUDA
(CLIP ViT-H-14 and GPSCLIP ViT-L/14 in fp16, SBERT), the CUDA context and workspaces. One llama.cpp
context holds at most 256 sequences: 42 images at 6 each, whatever the memory (the bracketed figure is
what memory alone allows; more needs fewer sequences per image or a second context on the same model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import attrs

MiB, GiB = 2**20, 2**30
# Qwen2.5-VL-7B-Instruct's text model as published (exporters/qwen_vl.py QWEN25VL_CONFIGS["7b"])
LAYERS, KV_HEADS, HEADS, HIDDEN, FFN, VOCAB = 28, 4, 28, 3584, 18944, 152064
HEAD_DIM = HIDDEN // HEADS  # 128
VISION_HEADS, VISION_WIDTH, VISION_FFN = 16, 1280, 3420
# published GGUF sizes (Qwen2.5-VL-7B-Instruct-Q4_K_M.gguf, mmproj-...-f16.gguf), used without --gguf/--mmproj
WEIGHTS_BYTES, MMPROJ_BYTES = 4_683_073_184, 1_354_163_552
ENCODERS_BYTES = int((986e6 + 304e6) * 2 + 23e6 * 4)  # ViT-H-14 (image+text) + ViT-L/14 image in fp16, SBERT fp32
CUDA_OVERHEAD_BYTES = 600 * MiB  # CUDA context, cuBLAS/cuDNN workspaces, ONNX Runtime's arena slack: estimate
N_SEQ_MAX, SEQS_PER_IMAGE, PROMPTS, N_UBATCH, N_CTX = 256, 6, 5, 512, 4096
SIZINGS = ("shared", "per_sequence", "n_ctx")
GPUS = {  # what nvidia-smi reports as total memory
    "24 GB (RTX 4090 / L4-class)": 24_564 * MiB,
    "80 GB (H100 / A100)": 81_559 * MiB,
    "141 GB (H200)": 143_771 * MiB,
}


def kv_bytes_per_cell(layers: int = LAYERS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, elem: int = 2) -> int:
    """K and V for one token over every layer."""
    return 2 * layers * kv_heads * head_dim * elem


@attrs.frozen
class ImageNeed:
    """One image's tokens: 640x480 gives 391 image tokens; the suffixes are the five prompts' texts."""

    prefix_text: int = 361
    image_tokens: int = 391
    suffixes: int = 1900
    cue_budget: int = 512
    answer_budget: int = 128
    n_ctx: int = N_CTX

    @property
    def prefix(self) -> int:
        return self.prefix_text + self.image_tokens

    def cells(self, sizing: str) -> int:
        """KV cells one image takes under a sizing (module docstring)."""
        budgets = self.cue_budget + (PROMPTS - 1) * self.answer_budget
        return {
            "shared": self.prefix + self.suffixes + budgets,
            "per_sequence": SEQS_PER_IMAGE * self.prefix + self.suffixes + budgets,
            "n_ctx": SEQS_PER_IMAGE * self.n_ctx,
        }[sizing]

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "cells": {s: self.cells(s) for s in SIZINGS}}


def compute_buffers(n_seq: int, n_ctx: int = N_CTX) -> int:
    """llama.cpp's graph reservation, the allowance clue2geo_sdk/engines/memory.py fits (estimate)."""
    n_tok = -(-N_UBATCH // n_seq) * n_seq
    micro = 4 * n_tok * (max(VOCAB, HEADS * n_ctx) + 4 * HIDDEN + 2 * FFN)
    return micro + n_seq * VOCAB * 4


def vision_compute(image_tokens: int) -> int:
    """The vision tower's graph for one image at its token count (memory.py's allowance, estimate)."""
    patches = 4 * image_tokens
    return patches * (6 * VISION_HEADS * patches + 16 * (VISION_WIDTH + VISION_FFN))


def fit(free: int, per_image: int) -> int:
    """The most images whose KV + compute buffers fit in ``free`` bytes (memory alone, before the cap)."""
    n = max(0, free // per_image)
    while n > 0 and n * per_image + compute_buffers(n * SEQS_PER_IMAGE) > free:
        n -= 1
    return n


@attrs.frozen
class Capacity:
    """Images in flight on one GPU: by memory alone, and capped by one context's 256 sequences."""

    gpu: str
    gpu_bytes: int
    fixed_bytes: int
    per_image_bytes: dict[str, int]
    images: dict[str, int]
    images_capped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def capacity(
    gpu: str,
    gpu_bytes: int,
    need: ImageNeed,
    *,
    weights: int = WEIGHTS_BYTES,
    mmproj: int = MMPROJ_BYTES,
    encoders: int = ENCODERS_BYTES,
    overhead: int = CUDA_OVERHEAD_BYTES,
) -> Capacity:
    fixed = weights + mmproj + encoders + overhead + vision_compute(need.image_tokens)
    per = {s: need.cells(s) * kv_bytes_per_cell() for s in SIZINGS}
    images = {s: fit(gpu_bytes - fixed, b) for s, b in per.items()}
    cap = N_SEQ_MAX // SEQS_PER_IMAGE
    return Capacity(gpu, gpu_bytes, fixed, per, images, {s: min(n, cap) for s, n in images.items()})


def table(need: ImageNeed, rows: list[Capacity]) -> str:
    cell = kv_bytes_per_cell()
    lines = [f"KV per token {cell / 1024:.0f} KiB (f16: 2 x {LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM} x 2 B)"]
    lines += [f"per image, {s}: {need.cells(s)} cells = {need.cells(s) * cell / MiB:.0f} MiB" for s in SIZINGS]
    lines.append(f"images in flight (memory alone in brackets; 256 sequences per context allow {N_SEQ_MAX // 6})")
    lines.append(f"{'GPU':<28} {'fixed GiB':>9} " + " ".join(f"{s:>14}" for s in SIZINGS))
    for r in rows:
        cols = " ".join(f"{f'{r.images_capped[s]} ({r.images[s]})':>14}" for s in SIZINGS)
        lines.append(f"{r.gpu:<28} {r.fixed_bytes / GiB:>9.1f} {cols}")
    lines.append("fixed = weights + mmproj (file sizes) + encoders, CUDA context, vision graph (estimates);")
    lines.append("compute buffers for the images in flight (estimate) are counted against the free memory")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, help="the Q4_K_M text GGUF (its size replaces the published one)")
    ap.add_argument("--mmproj", type=Path, help="the mmproj GGUF (its size replaces the published one)")
    ap.add_argument("--gpu-gib", type=float, action="append", default=[], help="add a GPU of this many GiB")
    ap.add_argument("--cue-budget", type=int, default=512)
    ap.add_argument("--answer-budget", type=int, default=128)
    ap.add_argument("--image-tokens", type=int, default=391, help="640x480: 391")
    ap.add_argument("--n-ctx", type=int, default=N_CTX, help="cells per sequence today (settings.N_CTX_DEFAULT)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    need = ImageNeed(
        image_tokens=args.image_tokens, cue_budget=args.cue_budget, answer_budget=args.answer_budget, n_ctx=args.n_ctx
    )
    weights = args.gguf.stat().st_size if args.gguf else WEIGHTS_BYTES
    mmproj = args.mmproj.stat().st_size if args.mmproj else MMPROJ_BYTES
    gpus = dict(GPUS)
    gpus.update({f"{g:g} GiB (given)": int(g * GiB) for g in args.gpu_gib if g > 0})
    rows = [capacity(k, v, need, weights=weights, mmproj=mmproj) for k, v in gpus.items()]
    if not args.json:
        print(table(need, rows))
        return
    doc = {
        "kv_bytes_per_cell": kv_bytes_per_cell(),
        "image": need.to_dict(),
        "fixed": {
            "weights": weights,
            "mmproj": mmproj,
            "encoders_estimate": ENCODERS_BYTES,
            "cuda_overhead_estimate": CUDA_OVERHEAD_BYTES,
            "vision_compute_estimate": vision_compute(need.image_tokens),
            "weights_from": str(args.gguf or "published size"),
            "mmproj_from": str(args.mmproj or "published size"),
        },
        "max_images_by_sequences": N_SEQ_MAX // SEQS_PER_IMAGE,
        "rows": [r.to_dict() for r in rows],
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
