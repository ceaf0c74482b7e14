"""GPU checks, deselected by default (``-m "not gpu"`` in pyproject); run with ``pytest -m gpu`` on a
machine with an NVIDIA GPU, onnxruntime-gpu and llama-cpp-python built with CUDA."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_onnxruntime_cuda_provider(demo_bundle: Path) -> None:
    import onnxruntime as ort

    from clue2geo_sdk.encoders import providers_for

    assert "CUDAExecutionProvider" in ort.get_available_providers()
    assert providers_for("cuda")[0] == "CUDAExecutionProvider"


def test_locate_on_gpu(demo_bundle: Path, photo: Path) -> None:
    from clue2geo_sdk import Geolocator

    with Geolocator.load(demo_bundle, device="cuda") as geo:
        pred = geo.locate(photo)
    print("gpu timings", pred.timings)
    assert -90 <= pred.lat <= 90


def test_bf16_training_step(tmp_path: Path, photo: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from clue2geo_sdk.image_tokens import IMAGE_MAX_TOKENS
    from exporters.qwen_vl import build_tiny_qwen25vl
    from training.config import LM_TARGETS
    from training.train import encode_example, load_processor

    base = build_tiny_qwen25vl(tmp_path / "base")
    proc = load_processor(base, IMAGE_MAX_TOKENS)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(base), dtype=torch.bfloat16).cuda()
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LM_TARGETS, task_type="CAUSAL_LM"))
    rec = {
        "image": str(photo),
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]},
            {"role": "assistant", "content": '{"lat": "40.0000", "lon": "116.0000"}'},
        ],
    }
    ex = {k: v.cuda() for k, v in encode_example(proc, rec, max_length=2048, image_max_tokens=IMAGE_MAX_TOKENS).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for i in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**ex).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        print(f"bf16 step {i}: loss {float(loss):.4f}, {time.perf_counter() - t0:.3f} s")
    assert torch.isfinite(loss)
