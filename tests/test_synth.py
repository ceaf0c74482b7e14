"""Real-shape bundles (issue 10): published shapes, both checkpoint layouts, ONNX external data,
and ``clue2geo bundle synth --shape tiny`` end to end. The 3b/7b builds are documented commands
(README), not CI steps; here their shapes are checked on the meta device (no memory)."""

from __future__ import annotations

import json
import math
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import EXAMPLE_IMAGES, FAST

from clue2geo_sdk import Bundle, BundleIntegrityError, ExportValidationError
from clue2geo_sdk.cli import main

# --- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "params", "tied"), [("7b", 8_292_166_656, False), ("3b", 3_754_622_976, True)])
def test_qwen_shapes_are_the_published_ones(shape: str, params: int, tied: bool) -> None:
    from exporters.qwen_vl import PUBLISHED_NAMES, QWEN25VL_CONFIGS, checkpoint_plan, qwen25vl_config

    cfg = QWEN25VL_CONFIGS[shape]
    plan = dict(checkpoint_plan(cfg))
    assert sum(math.prod(s) for s in plan.values()) == params
    assert set(PUBLISHED_NAMES) <= set(plan)
    assert ("lm_head.weight" in plan) is not tied
    vocab = 152064 if shape == "7b" else 151936
    hidden = cfg["hidden_size"]
    assert plan["model.embed_tokens.weight"] == (vocab, hidden)
    assert plan["visual.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert plan["visual.blocks.31.attn.qkv.weight"] == (3 * 1280, 1280)
    assert plan["visual.blocks.31.mlp.gate_proj.weight"] == (3420, 1280)
    assert plan["visual.merger.mlp.2.weight"] == (hidden, 5120)  # 2x2 merge of 1280
    assert plan["model.layers.0.self_attn.k_proj.weight"] == (cfg["num_key_value_heads"] * 128, hidden)
    c = qwen25vl_config(cfg)  # transformers reads the flat published form as intended
    assert c.text_config.num_hidden_layers == cfg["num_hidden_layers"]
    assert c.vision_config.fullatt_block_indexes == [7, 15, 23, 31] and c.vision_config.window_size == 112
    assert c.text_config.rope_scaling["mrope_section"] == [16, 24, 24]
    assert hidden % 256 == 0 and cfg["intermediate_size"] % 256 == 0  # K-quant rows


def test_clip_shapes_are_vit_h14_and_vit_l14() -> None:
    import open_clip
    from open_clip.model import CLIP
    from transformers import CLIPConfig, CLIPModel

    from exporters.synth import CLIP_ARCH, CLIP_VIT_L14

    assert CLIP_ARCH["7b"] == "ViT-H-14"
    with torch.device("meta"):  # open_clip.create_model's own config, without create_model's .to(device)
        h = CLIP(**open_clip.get_model_config("ViT-H-14"))
        vit_l = CLIPModel(CLIPConfig(**CLIP_VIT_L14))
    vision_h = sum(p.numel() for p in h.visual.parameters())
    assert 630e6 < vision_h < 635e6 and 4 * vision_h > 2**31  # above ONNX's single-file limit
    assert h.visual.image_size == (224, 224) and h.text_projection.shape == (1024, 1024)
    vision_l = sum(p.numel() for p in vit_l.vision_model.parameters())
    assert 300e6 < vision_l < 305e6 and vit_l.visual_projection.weight.shape == (768, 1024)


# --- ONNX external data ---------------------------------------------------------------------------


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(48, 256), torch.nn.GELU(), torch.nn.Linear(256, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_external_data_forced_below_2gb(tmp_path: Path) -> None:
    import onnx

    from exporters._onnx import DATA_ALIGN, export_module, fp16_variant, onnx_files, run_onnx

    torch.manual_seed(0)
    mod, x = _Mlp().eval(), torch.randn(3, 48)
    one = export_module(mod, (x,), tmp_path / "one" / "m.onnx", input_names=["x"], output_names=["y"])
    assert onnx_files("m", one) == {"m": one}  # small: one file, as before
    ext = export_module(
        mod, (x,), tmp_path / "ext" / "m.onnx", input_names=["x"], output_names=["y"], external_data_above=0
    )
    files = onnx_files("m", ext)
    assert set(files) == {"m", "m_data"} and files["m_data"].name == "m.onnx.data"
    assert sorted(p.name for p in ext.parent.iterdir()) == ["m.onnx", "m.onnx.data"]  # no scratch left
    proto = onnx.load(str(ext), load_external_data=False)
    offsets = [int(kv.value) for t in proto.graph.initializer for kv in t.external_data if kv.key == "offset"]
    assert offsets and all(o % DATA_ALIGN == 0 for o in offsets)
    with torch.no_grad():
        ref = mod(x).numpy()
    for path in (one, ext):
        assert np.max(np.abs(run_onnx(path, {"x": x.numpy()})[0] - ref)) < 1e-5
    verdict = fp16_variant(ext, ext.parent / "m_fp16.onnx", {"x": x.numpy()}, ref, external_data_above=0)
    assert verdict["ok"] and verdict["cos_min"] > 0.999, verdict
    assert verdict["files"] == ["m_fp16.onnx", "m_fp16.onnx.data"]
    bad = fp16_variant(ext, ext.parent / "bad.onnx", {"x": x.numpy()}, -ref)  # a reference it cannot match
    assert not bad["ok"] and "cosine" in bad["reason"] and not (ext.parent / "bad.onnx").exists()


# --- checkpoint layouts ---------------------------------------------------------------------------


def _fake_safetensors(path: Path, names: list[str]) -> None:
    header = {n: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, n in enumerate(names)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * len(names))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.attn.qkv.weight"], "in-memory names"),
        (["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight", "visual.blocks.0.attn.qkv.weight"], "LoRA"),
        (["model.layers.0.mlp.up_proj.weight"], "no vision tower"),
    ],
)
def test_layouts_the_converter_would_get_wrong_are_refused(tmp_path: Path, names: list[str], message: str) -> None:
    from exporters.vlm_gguf import checkpoint_layout

    _fake_safetensors(tmp_path / "model.safetensors", names)
    with pytest.raises(ExportValidationError, match=message):
        checkpoint_layout(tmp_path)


def test_hub_and_training_layouts_convert_to_the_same_gguf(tmp_path: Path) -> None:
    """One tiny random model, written (a) in the published hub layout (bf16 shards + index) and (b) the
    way this project's training writes a stage (transformers 4.57 from_pretrained, LoRA, merge, fp32
    save_pretrained, finalize); llama.cpp converts both to the same GGUF tensors and metadata."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from exporters.qwen_vl import QWEN25VL_CONFIGS, qwen25vl_config, write_model_as_hub_checkpoint
    from exporters.vlm_gguf import _run_converter, checkpoint_layout, gguf_contents, llama_cpp_source
    from training.config import StageConfig
    from training.train import finalize_hf_folder

    cfg = QWEN25VL_CONFIGS["tiny"]
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(cfg)).eval()
    hub = tmp_path / "hub"
    info = write_model_as_hub_checkpoint(model, hub, cfg, max_shard_bytes=30_000_000)  # force several shards
    assert info["shards"] > 1
    del model

    trained = tmp_path / "trained"
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hub), dtype=torch.float32)
    stage = StageConfig(stage="rc")
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=stage.target_modules, task_type="CAUSAL_LM")
    )
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    peft_model.merge_and_unload().to(torch.float32).save_pretrained(str(trained), safe_serialization=True)
    finalize_hf_folder(hub, trained)

    a, b = checkpoint_layout(hub), checkpoint_layout(trained)
    assert a["dtypes"] == {"BF16": a["tensors"]} and b["dtypes"] == {"F32": b["tensors"]}
    assert a["files"] > 1 and b["files"] == 1 and a["tensors"] == b["tensors"]

    src = llama_cpp_source()
    jobs = [(name, folder, mm) for name, folder in (("hub", hub), ("trained", trained)) for mm in (False, True)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # four converter processes side by side
        runs = list(
            pool.map(
                lambda j: _run_converter(src, j[1], tmp_path / f"{j[0]}{'-mmproj' if j[2] else ''}.gguf", mmproj=j[2]),
                jobs,
            )
        )
    assert all(r["peak_rss_mb"] > 0 and r["bytes"] > 0 for r in runs)
    got = {}
    for name in ("hub", "trained"):
        got[name] = {
            kind: gguf_contents(tmp_path / f"{name}{suffix}.gguf", src)
            for kind, suffix in (("text", ""), ("mmproj", "-mmproj"))
        }
    for kind in ("text", "mmproj"):
        (ta, fa), (tb, fb) = got["hub"][kind], got["trained"][kind]
        assert len(ta) > 10 and ta == tb, kind  # names, types, shapes and bytes
        keep = lambda f: {k: v for k, v in f.items() if not k.startswith("general.")}  # noqa: E731
        assert keep(fa) == keep(fb), kind
    assert sum(1 for n in got["hub"]["mmproj"][0] if n.startswith("v.blk.")) > 0


# --- bundle synth --shape tiny ------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``clue2geo bundle synth --shape tiny`` with every ONNX tower forced to external data."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    res = CliRunner().invoke(main, ["bundle", "synth", str(out), "--shape", "tiny", "--external-data-above", "0"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return out


def test_synth_tiny_builds_marks_and_verifies(synth_tiny: Path) -> None:
    b = Bundle.open(synth_tiny, verify=True)
    assert b.name == "synth-tiny" and b.demo
    assert set(b.extra["random_components"]) == {"vlm", "clip", "gpsclip"}
    assert not b.component("sbert").random_weights
    assert b.component("vlm").provenance["checkpoint"]["layout"] == "published"
    assert b.extra["synth"]["shape"] == "tiny" and b.extra["build_peak_rss_mb"]
    clip, gps = b.component("clip"), b.component("gpsclip")
    assert {"image_data", "text_data", "image_fp16", "text_fp16"} <= set(clip.files)
    assert {"image_data", "location_data", "image_fp16"} <= set(gps.files) and "location_fp16" not in gps.files
    for comp in (clip, gps):
        for key, verdict in comp.params["fp16"].items():
            assert verdict["ok"] and verdict["cos_min"] >= 0.999, (comp.role, key)
    runner = CliRunner()
    ok = runner.invoke(main, ["bundle", "verify", str(synth_tiny)])
    assert ok.exit_code == 0 and "21 files verified" in ok.output, ok.output
    # the sidecar is not re-opened by anything that could skip it: a flipped byte is caught
    copy = synth_tiny.parent / "tampered"
    shutil.copytree(synth_tiny, copy)
    data = copy / clip.files["image_data"].path
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleIntegrityError, match="image.onnx.data"):
        Bundle.open(copy, verify=True)
    bad = runner.invoke(main, ["bundle", "verify", str(copy)])
    assert bad.exit_code == 1
    # --overwrite removes the sidecars too (they are the bundle's own files), leaving nothing behind
    from clue2geo_sdk.bundle.writer import remove_bundle

    remove_bundle(copy)
    assert not copy.exists() or not any(copy.rglob("*"))


def test_synth_tiny_runs_end_to_end_from_external_data(synth_tiny: Path) -> None:
    from clue2geo_sdk import Geolocator
    from exporters.clip_onnx import tiny_open_clip

    with Geolocator.load(synth_tiny, device="cpu", max_in_flight=1, **FAST) as geo:
        pred = geo.locate(EXAMPLE_IMAGES / "summer_palace_beijing.jpg")
        emb = geo.clip.encode_texts(["a red pillar"])
    assert -90 <= pred.lat <= 90 and -180 <= pred.lon <= 180 and pred.candidates
    assert {"cues", "direct", "retrieval", "selection"} <= set(pred.timings)
    # the text tower read from graph + .data reproduces the random open_clip it was exported from
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(synth_tiny / "clip" / "tokenizer.json"))
    ids = torch.tensor([tok.encode("a red pillar").ids])
    with torch.no_grad():
        ref = tiny_open_clip(0).encode_text(ids).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.max(np.abs(ref - emb)) < 1e-5


def test_synth_refuses_a_folder_it_does_not_own(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    res = CliRunner().invoke(main, ["bundle", "synth", str(tmp_path), "--shape", "tiny"])
    assert res.exit_code == 1 and "not empty" in res.output
    assert (tmp_path / "mine.txt").read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


def test_synth_tiny_gguf_matches_the_random_checkpoint(synth_tiny: Path) -> None:
    """The GGUF pair holds the checkpoint's weights: mmproj (f16) bit for bit, the Q4_K_M text model
    within quantization error."""
    from exporters.synth import gguf_parity

    rows = {r["tensor"]: r for r in gguf_parity(synth_tiny, "tiny")}
    assert "output.weight" not in rows  # tiny ties its embeddings, as the published 3B does
    for name in ("v.blk.0.attn_q.weight", "v.blk.3.attn_v.weight", "mm.0.weight", "mm.2.weight"):
        assert rows[name]["type"] == "F16" and rows[name]["exact_f16"], rows[name]
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        assert rows[name]["type"] not in ("F16", "F32") and rows[name]["cos"] > 0.99, rows[name]
    assert rows["blk.1.attn_q.bias"]["exact_f16"] and rows["blk.1.attn_q.bias"]["cos"] > 0.999999
