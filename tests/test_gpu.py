"""GPU checks, deselected by default (``-m "not gpu"`` in pyproject); run with ``pytest -m gpu`` on a
machine with an NVIDIA GPU, onnxruntime-gpu and llama-cpp-python built with CUDA.

Each check fails on a CPU-only build: llama.cpp must be able to offload, the loaded encoders' sessions
must run on CUDA, llama.cpp must report its layers and KV cache on the GPU, and the GPU's memory in
use must grow by at least what llama.cpp says it put there."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu


def test_llama_cpp_offloads_to_the_gpu() -> None:
    import llama_cpp

    assert llama_cpp.llama_supports_gpu_offload(), "llama-cpp-python was built without GPU support (CPU-only)"


def test_onnxruntime_cuda_provider(demo_bundle: Path) -> None:
    import onnxruntime as ort

    from clue2geo_sdk.engines.encoders import providers_for

    assert "CUDAExecutionProvider" in ort.get_available_providers()
    assert providers_for("cuda")[0] == "CUDAExecutionProvider"


@pytest.fixture
def llama_log() -> Iterator[Callable[[], list[str]]]:
    """A reader of llama.cpp's log lines so far (the SDK's silencing is restored after)."""
    import llama_cpp

    from clue2geo_sdk.engines import base

    pieces: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: object) -> None:
        pieces.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lambda: "".join(pieces).splitlines()
    finally:
        base.silence_native_logs()
        llama_cpp.llama_log_set(base._SILENT_CALLBACK, ctypes.c_void_p(0))


def _gpu_used_mib() -> int:
    """Memory in use on the first GPU, from nvidia-smi (the driver's own count, every process's)."""
    smi = shutil.which("nvidia-smi")
    assert smi, "nvidia-smi is not on PATH: this is not a machine with an NVIDIA driver"
    out = subprocess.run(
        [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def test_locate_on_gpu(demo_bundle: Path, photo: Path, llama_log: Callable[[], list[str]]) -> None:
    """The pipeline on the GPU: encoders on CUDA, every layer and the KV cache offloaded, the GPU's
    memory grown by at least what llama.cpp put there, and a valid prediction."""
    import onnxruntime as ort

    from clue2geo_sdk import Bundle, Geolocator
    from clue2geo_sdk.engines.memory import memory_need

    before = _gpu_used_mib()
    with Geolocator.load(demo_bundle, device="cuda", max_in_flight=2, max_cue_tokens=96, max_answer_tokens=48) as geo:
        sessions = [
            s
            for enc in (geo.clip, geo.gpsclip, geo.sbert)
            for s in vars(enc).values()
            if isinstance(s, ort.InferenceSession)
        ]
        assert len(sessions) >= 4
        for s in sessions:
            assert s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers()
        pred = geo.locate(photo)
        during = _gpu_used_mib()
    lines = llama_log()
    offloaded = [m.groups() for s in lines if (m := re.search(r"offloaded (\d+)/(\d+) layers to GPU", s))]
    assert offloaded and offloaded[0][0] == offloaded[0][1], offloaded
    on_gpu = [
        float(m.group(1))
        for s in lines
        if (m := re.search(r"CUDA\d+ (?:KV|model|compute) buffer size = +([\d.]+) MiB", s))
    ]
    kv_gpu = [s for s in lines if re.search(r"CUDA\d+ KV buffer size", s)]
    assert kv_gpu and on_gpu, lines[-30:]
    assert during - before >= sum(on_gpu), (before, during, on_gpu)
    # the host-memory check counts no KV cache and no offloaded layer when everything is on the GPU
    need = memory_need(Bundle.open(demo_bundle), max_in_flight=2, device="cuda")
    assert need.gpu_layers == need.n_layer and need.parts["KV cache"] == 0
    print("gpu timings", pred.timings, "GPU MiB", before, "->", during)
    assert -90 <= pred.lat <= 90 and -180 <= pred.lon <= 180 and pred.source


def test_bf16_training_step(tmp_path: Path, photo: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    from clue2geo_sdk.engines.image_tokens import IMAGE_MAX_TOKENS
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
