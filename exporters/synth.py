"""Bundles with random weights at the exact shapes of the published models (``clue2geo bundle synth``).

No checkpoint can be downloaded here, but their shapes can be built. ``build_synth`` writes random
checkpoints in the layouts real users have — Qwen2.5-VL in the published Hugging Face layout
(bf16 shards + index), GeoCLIP's CLIP ViT-L/14 backbone as a Hugging Face ``CLIPModel`` folder, the
cluemap CLIP as an open_clip model — and hands them to :func:`exporters.bundle_builder.build_bundle`,
the same call a user with real weights makes. The real parts (MiniLM, GeoCLIP's location tower and
MLP, the 100K gallery, GeoNames) are the demo's. The manifest marks the random parts.

Shapes: ``tiny`` (the demo's stand-ins), ``3b`` and ``7b`` (Qwen2.5-VL-3B / 7B-Instruct as
published; cluemap CLIP at open_clip ViT-H-14; GPSCLIP image backbone at CLIP ViT-L/14).
Memory: the VLM is written shard by shard in bf16 (never whole, never fp32); llama.cpp's converter
maps it lazily; the CLIP model is created only when its step starts and dropped after it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from clue2geo_sdk.bundle.manifest import Bundle
from clue2geo_sdk.bundle.writer import check_target

from . import clip_onnx, qwen_vl
from ._onnx import EXTERNAL_DATA_ABOVE
from .bundle_builder import build_bundle, console, step
from .vlm_gguf import gguf_module

SHAPES = ("tiny", "3b", "7b")
CLIP_ARCH = {"tiny": "tiny open_clip CLIP", "3b": "ViT-H-14", "7b": "ViT-H-14"}
QWEN_NAME = {"tiny": "tiny Qwen2.5-VL", "3b": "Qwen2.5-VL-3B-Instruct", "7b": "Qwen2.5-VL-7B-Instruct"}

# openai/clip-vit-large-patch14 (GeoCLIP's image backbone) as published; "tiny" keeps the 768-d
# projection GeoCLIP's MLP needs.
CLIP_VIT_L14 = {
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "image_size": 224,
        "patch_size": 14,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "projection_dim": 768,
}
CLIP_TINY = {
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "projection_dim": 768,
    },
    "vision_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "image_size": 224,
        "patch_size": 32,
        "projection_dim": 768,
    },
    "projection_dim": 768,
}


def random_open_clip(shape: str, seed: int = 0):  # -> open_clip.CLIP
    """The cluemap CLIP: open_clip's own ViT-H-14 configuration with random weights (or the tiny one)."""
    if shape == "tiny":
        return clip_onnx.tiny_open_clip(seed)
    torch.manual_seed(seed)
    return open_clip.create_model(CLIP_ARCH[shape], pretrained=None).eval()


def write_random_clip_vit(out_dir: str | Path, shape: str, seed: int = 0) -> Path:
    """A Hugging Face ``CLIPModel`` folder (config + model.safetensors, the published names) at
    CLIP ViT-L/14 shape with random weights: what ``build_bundle(clip_vision_dir=...)`` reads."""
    from transformers import CLIPConfig, CLIPModel  # export extra, heavy: loaded only to write this checkpoint

    cfg = CLIPConfig(**(CLIP_TINY if shape == "tiny" else CLIP_VIT_L14))
    cfg.architectures = ["CLIPModel"]
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_synth(
    out: str | Path,
    *,
    shape: str = "tiny",
    seed: int = 0,
    overwrite: bool = False,
    quant: str = "Q4_K_M",
    external_data_above: int = EXTERNAL_DATA_ABOVE,
    workdir: str | Path | None = None,
    check_max_tokens: int = 96,
) -> Bundle:
    """Build a random-weight bundle at a published shape through :func:`build_bundle`.

    The random checkpoints go to a scratch folder under ``workdir`` (default: beside ``out``, so on
    the same disk) and are deleted at the end. Disk at 7b: ~17 GB checkpoint + ~15 GB f16 GGUF at the
    peak; the bundle is ~12 GB.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    out = Path(out)
    # the folder rules (new/empty, or --overwrite of a bundle) are checked before hours of work; nothing
    # is deleted: build_bundle replaces an old bundle only once the new one is complete
    check_target(out, overwrite=overwrite)
    scratch = Path(workdir) if workdir is not None else out.resolve().parent
    scratch.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    peaks: dict[str, int] = {}
    qcfg = qwen_vl.QWEN25VL_CONFIGS[shape]
    with tempfile.TemporaryDirectory(dir=scratch, prefix=f".c2g-synth-{shape}-") as tmp:
        qwen_dir, vit_dir = Path(tmp) / "qwen2.5-vl", Path(tmp) / "clip-vit-large-patch14"
        with step(f"random {QWEN_NAME[shape]} checkpoint (published layout, bf16 shards)", timings, peaks):
            qinfo = qwen_vl.write_random_qwen25vl(qwen_dir, shape, seed=seed)
        with step("random CLIP ViT-L/14 checkpoint (GeoCLIP's image backbone)", timings, peaks):
            write_random_clip_vit(vit_dir, shape, seed)
        bundle = build_bundle(
            out,
            name=f"synth-{shape}",
            qwen_dir=qwen_dir,
            clip_model=lambda: random_open_clip(shape, seed),
            clip_vision_dir=vit_dir,
            quant=quant,
            seed=seed,
            overwrite=overwrite,
            fp16=True,
            external_data_above=external_data_above,
            random_components=("vlm", "clip", "gpsclip"),
            provenance={
                "vlm": {"shape": QWEN_NAME[shape], "config": qcfg, "checkpoint_files": qinfo},
                "clip": {"shape": f"open_clip {CLIP_ARCH[shape]}"},
                "gpsclip": {"image_shape": "tiny CLIP vision" if shape == "tiny" else "CLIP ViT-L/14"},
            },
            extra={
                "synth": {"shape": shape, "seed": seed, "checkpoint_seconds": timings, "checkpoint_peak_rss_mb": peaks}
            },
            check_max_tokens=check_max_tokens,
        )
    console.print(f"[yellow]bundle {bundle.name!r} has random weights at real shapes: plumbing only[/yellow]")
    return bundle


def synth_summary(bundle: Bundle) -> dict[str, Any]:
    """Per component: files and bytes, parity, fp16 verdicts; and the build's seconds and peaks."""
    comps = {}
    for role, comp in bundle.components.items():
        comps[role] = {
            "bytes": sum(f.bytes for f in comp.files.values()),
            "files": {k: f.bytes for k, f in comp.files.items()},
            "parity": comp.provenance.get("parity"),
            "fp16": comp.params.get("fp16"),
            "steps": comp.provenance.get("steps"),
        }
    return {
        "name": bundle.name,
        "components": comps,
        "build_seconds": bundle.extra.get("build_seconds"),
        "build_peak_rss_mb": bundle.extra.get("build_peak_rss_mb"),
        "synth": bundle.extra.get("synth"),
    }


def _parity_pairs(cfg: dict[str, Any]) -> list[tuple[str, str, str, int | None]]:
    """(GGUF file key, GGUF tensor, checkpoint tensor, third of a fused vision qkv or None): the first
    and last layers of the text model and the vision tower, the embeddings, the head and the merger."""
    last, vlast = cfg["num_hidden_layers"] - 1, cfg["vision_config"]["depth"] - 1
    text, vision = "model", "mmproj"
    return [
        (text, "token_embd.weight", "model.embed_tokens.weight", None),
        (text, "output.weight", "lm_head.weight", None),
        (text, "blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", None),
        (text, "blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight", None),
        (text, f"blk.{last}.ffn_down.weight", f"model.layers.{last}.mlp.down_proj.weight", None),
        (text, f"blk.{last}.attn_q.bias", f"model.layers.{last}.self_attn.q_proj.bias", None),
        (vision, "v.blk.0.attn_q.weight", "visual.blocks.0.attn.qkv.weight", 0),
        (vision, f"v.blk.{vlast}.attn_v.weight", f"visual.blocks.{vlast}.attn.qkv.weight", 2),
        (vision, f"v.blk.{vlast}.ffn_gate.weight", f"visual.blocks.{vlast}.mlp.gate_proj.weight", None),
        (vision, "mm.0.weight", "visual.merger.mlp.0.weight", None),
        (vision, "mm.2.weight", "visual.merger.mlp.2.weight", None),
    ]


def _compare(t: Any, hname: str, hshape: tuple[int, ...], seed: int, third: int | None, rows: int) -> dict[str, Any]:
    """One GGUF tensor ``t`` (its first ``rows`` rows, dequantized) against the checkpoint's tensor
    ``hname``, made again from its shape and the seed."""
    from gguf.quants import dequantize  # from llama.cpp's gguf-py, on sys.path once gguf_module() ran

    data = t.data[:rows] if t.data.ndim > 1 else t.data  # dequantizing a whole 545M-entry tensor takes > 10 GB
    got = np.asarray(dequantize(np.ascontiguousarray(data), t.tensor_type), dtype=np.float32)
    ref = qwen_vl.random_tensor(hname, hshape, seed).float()
    if third is not None:  # llama.cpp splits the fused vision qkv
        n = ref.shape[0] // 3
        ref = ref[third * n : (third + 1) * n]
    ref_np = ref.reshape(-1, got.shape[-1])[: got.shape[0] if got.ndim > 1 else None].numpy().reshape(got.shape)
    del ref
    a, b = got.ravel().astype(np.float64), ref_np.ravel().astype(np.float64)
    return {
        "tensor": t.name,
        "type": t.tensor_type.name,
        "rows_checked": int(got.shape[0]) if got.ndim > 1 else 1,
        "cos": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)),
        "rel_rmse": float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30)),
        "exact_f16": bool(np.array_equal(got, ref_np.astype(np.float16).astype(np.float32))),
    }


def gguf_parity(bundle_dir: str | Path, shape: str, *, seed: int = 0, rows: int = 512) -> list[dict[str, Any]]:
    """GGUF tensors of a synth bundle vs the random checkpoint they were converted from.

    The checkpoint is gone after the build, but its weights are a function of (name, shape, seed)
    (:func:`exporters.qwen_vl.random_tensor`), so they are made again and compared with the first
    ``rows`` rows of the text GGUF (dequantized) and the mmproj (f16: must equal the checkpoint's
    values rounded to f16 exactly). Returns one row per tensor: type, cosine, relative RMSE, exact.
    """
    bundle = Bundle.open(bundle_dir, verify=False)
    gguf = gguf_module()
    cfg = qwen_vl.QWEN25VL_CONFIGS[shape]
    plan = dict(qwen_vl.checkpoint_plan(cfg))
    readers: dict[str, Any] = {}
    out = []
    for key, gname, hname, third in _parity_pairs(cfg):
        if hname not in plan:  # e.g. lm_head of a tied model
            continue
        if key not in readers:  # parsing the text GGUF's 152k-token vocabulary takes seconds: once per file
            readers[key] = gguf.GGUFReader(str(bundle.file("vlm", key)))
        t = next(t for t in readers[key].tensors if t.name == gname)
        out.append(_compare(t, hname, plan[hname], seed, third, rows))
    return out
