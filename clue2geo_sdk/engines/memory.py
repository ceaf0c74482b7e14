"""The load-time memory check: what loading a bundle will take from host memory, counted from the
GGUF headers before llama.cpp allocates it, and a refusal in one sentence when it does not fit (the
OOM killer would otherwise end the process without a word)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from .._native import llama_cpp_module
from ..bundle.manifest import Bundle
from ..errors import InsufficientMemoryError
from ..options import whole_number
from . import base
from .batched import MAX_SEQUENCES, seqs_per_image
from .encoders import Device, device_providers
from .gguf_header import TextModelShape, read_header, tensor_bytes, text_model_shape
from .image_tokens import IMAGE_MAX_TOKENS
from .settings import N_CTX_DEFAULT, vlm_int

N_UBATCH = 512  # the engines' micro-batch (llama.cpp's default): sizes the compute buffers
GiB = 2**30


@attrs.frozen(kw_only=True)
class MemoryNeed:
    """Host memory (RAM) a load needs, by part, in bytes, and how it was counted.

    ``kv_cells`` is the KV cache's size in cells (``n_ctx`` per sequence x sequences) and
    ``kv_bytes_per_cell`` K and V in f16 over the layers kept in host memory: exactly what llama.cpp
    allocates. Compute buffers are an allowance fitted to llama.cpp's reservations (it sizes them from
    the graph at load): one micro-batch's logits or attention scores plus activations, an output row
    per sequence, and the vision tower's full-attention scores for one image at the token budget."""

    parts: dict[str, int]
    engine: str
    max_in_flight: int
    seqs_per_image: int
    n_seq: int
    n_ctx: int
    kv_cells: int
    kv_bytes_per_cell: int
    gpu_layers: int
    n_layer: int

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "total": self.total}


def _gpu_offload_supported() -> bool:
    try:
        return bool(llama_cpp_module().llama_supports_gpu_offload())
    except (ImportError, AttributeError, OSError):
        return False


@attrs.frozen(kw_only=True)
class _Offload:
    """Which text-model layers llama.cpp puts on a GPU: the last ``on_gpu`` repeating layers (from
    ``first_gpu``), and the output layer too when ``all_on_gpu``."""

    gpu: bool
    on_gpu: int
    first_gpu: int
    all_on_gpu: bool


def _offload(shape: TextModelShape, device: Device, n_gpu_layers: int) -> _Offload:
    gpu = device != "cpu" and n_gpu_layers != 0 and _gpu_offload_supported()
    # llama.cpp offloads the last n_gpu_layers repeating layers (all, and the output, at -1 or above n_layer)
    on_gpu = 0 if not gpu else shape.n_layer if n_gpu_layers < 0 else min(n_gpu_layers, shape.n_layer)
    all_on_gpu = gpu and (n_gpu_layers < 0 or n_gpu_layers > shape.n_layer)
    return _Offload(gpu=gpu, on_gpu=on_gpu, first_gpu=shape.n_layer - on_gpu, all_on_gpu=all_on_gpu)


def _host_weights(model: Path, off: _Offload) -> int:
    """Bytes of the text model's tensors that stay in host memory."""

    def host_tensor(name: str) -> bool:
        if name.startswith("blk."):
            return int(name.split(".")[1]) < off.first_gpu
        if name.startswith(("output", "output_norm")):
            return not off.all_on_gpu
        return True  # token embeddings stay in host memory (llama.cpp's input layer)

    return sum(n for k, n in tensor_bytes(model).items() if host_tensor(k))


def _vision_parts(mmproj: Path, budget: int) -> dict[str, int]:
    """The vision projector in host memory (mtmd puts it where the text model's layers are)."""
    keys = ("attention.head_count", "embedding_length", "feed_forward_length")
    v = read_header(mmproj, [f"clip.vision.{k}" for k in keys])
    heads, width, ffn = (v.get(f"clip.vision.{k}") for k in keys)
    parts = {"vision projector": Path(mmproj).stat().st_size}
    if whole_number(heads) and whole_number(width):
        # The vision tower's graph for an image at the budget (2x2 patches per token, P of them):
        # full-attention scores of 6 bytes per head per pair (f32 scores and softmax, overlapping)
        # and the activations; fitted to llama.cpp's reservation (201 MiB at P=4096 on the demo).
        patches, vff = 4 * budget, int(ffn) if whole_number(ffn) else 4 * int(width)
        parts["vision compute"] = patches * (6 * int(heads) * patches + 16 * (int(width) + vff))
    return parts


def _encoder_parts(bundle: Bundle, device: Device) -> dict[str, int]:
    """The ONNX encoders' float32 files, when the CPU runs them (on CUDA they live on the GPU)."""
    if device_providers(device)[:1] == ["CUDAExecutionProvider"]:
        return {}
    size = sum(
        f.bytes
        for role in ("clip", "gpsclip", "sbert")
        if role in bundle.components
        for k, f in bundle.component(role).files.items()
        if not k.endswith("fp16")
    )
    return {"encoders": size}


@attrs.frozen(kw_only=True)
class _MemoryModel:
    """A bundle's headers read once (:func:`_memory_model`); :meth:`need` for any images in flight."""

    engine: str
    fixed: dict[str, int]  # "vlm weights" first, then the parts that do not grow with images in flight
    seqs: int
    n_ctx: int
    per_cell: int
    shape: TextModelShape
    n_ff: int
    cpu_graph: bool  # some of the graph runs on the CPU
    on_gpu: int

    def need(self, max_in_flight: int) -> MemoryNeed:
        n_seq = max_in_flight * self.seqs if self.engine == "batched" else 1
        parts = {"vlm weights": self.fixed["vlm weights"], "KV cache": self.n_ctx * n_seq * self.per_cell}
        if self.cpu_graph:
            parts["compute buffers"] = self._compute_buffers(n_seq)
        parts.update((k, v) for k, v in self.fixed.items() if k != "vlm weights")
        return MemoryNeed(
            parts=parts,
            engine=self.engine,
            max_in_flight=max_in_flight,
            seqs_per_image=self.seqs,
            n_seq=n_seq,
            n_ctx=self.n_ctx,
            kv_cells=self.n_ctx * n_seq,
            kv_bytes_per_cell=self.per_cell,
            gpu_layers=self.on_gpu,
            n_layer=self.shape.n_layer,
        )

    def _compute_buffers(self, n_seq: int) -> int:
        """llama.cpp reserves its graph for one micro-batch with every token an output (its logits),
        the tokens rounded up to a multiple of the sequences; and an output row per sequence."""
        shape = self.shape
        logits = shape.n_vocab * 4  # one float32 row of logits
        n_tok = -(-N_UBATCH // n_seq) * n_seq
        micro = 4 * n_tok * (max(shape.n_vocab, shape.n_head * self.n_ctx) + 4 * shape.n_embd + 2 * self.n_ff)
        size = micro + n_seq * logits
        if self.engine == "chat":  # llama-cpp-python's own float32 scores array, n_batch rows
            size += N_UBATCH * logits
        return size


def _memory_model(
    bundle: Bundle, *, engine: str, samples_per_prompt: int, device: Device, n_gpu_layers: int | None
) -> _MemoryModel:
    """Read the bundle's headers once; the need is then a function of the images in flight."""
    if n_gpu_layers is None:
        n_gpu_layers = 0 if device == "cpu" else -1
    model, mmproj = bundle.file("vlm", "model"), bundle.file("vlm", "mmproj")
    shape = text_model_shape(model)
    n_ctx = vlm_int(bundle, "n_ctx", N_CTX_DEFAULT)
    budget = vlm_int(bundle, "image_max_tokens", IMAGE_MAX_TOKENS)
    off = _offload(shape, device, n_gpu_layers)
    fixed = {"vlm weights": _host_weights(model, off)}
    ff = read_header(model, [f"{shape.arch}.feed_forward_length"]).get(f"{shape.arch}.feed_forward_length")
    if not off.gpu:  # mtmd puts the vision tower where the text model's layers are
        fixed.update(_vision_parts(mmproj, budget))
    fixed.update(_encoder_parts(bundle, device))
    return _MemoryModel(
        engine=engine,
        fixed=fixed,
        seqs=seqs_per_image(samples_per_prompt) if engine == "batched" else 1,
        n_ctx=n_ctx,
        per_cell=sum(shape.n_head_kv[: off.first_gpu]) * (shape.head_dim_k + shape.head_dim_v) * 2,
        shape=shape,
        n_ff=int(ff) if whole_number(ff) else 4 * shape.n_embd,
        cpu_graph=off.first_gpu > 0 or not off.all_on_gpu,
        on_gpu=off.on_gpu,
    )


def memory_need(
    bundle: Bundle,
    *,
    engine: str = "batched",
    max_in_flight: int = 4,
    samples_per_prompt: int = 1,
    device: Device = "auto",
    n_gpu_layers: int | None = None,
) -> MemoryNeed:
    """Host memory to load ``bundle`` with these settings: VLM weights (less the layers llama.cpp
    offloads to a GPU), the KV cache (``n_ctx`` cells per sequence, f16 K and V, sized from the GGUF
    header), compute buffers, the vision projector and the ONNX encoders when they run on the CPU."""
    return _memory_model(
        bundle, engine=engine, samples_per_prompt=samples_per_prompt, device=device, n_gpu_layers=n_gpu_layers
    ).need(max_in_flight)


def available_memory() -> int | None:
    """Memory a load can take: the system's MemAvailable, bounded by the container's (cgroup) limit."""
    avail = base.available_memory_bytes()  # through the module: tests replace it there
    limit = _cgroup_room()
    if limit is not None:
        avail = limit if avail is None else min(avail, limit)
    return avail


def _cgroup_room() -> int | None:
    """Room left under a cgroup v2 (or v1) memory limit: limit - (usage - reclaimable file cache)."""
    for limit_f, usage_f, stat_f, key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        base_dir = Path("/sys/fs/cgroup")
        try:
            raw = (base_dir / limit_f).read_text().strip()
            if raw == "max" or int(raw) >= 1 << 60:
                return None
            usage = int((base_dir / usage_f).read_text().strip())
            cache = 0
            for line in (base_dir / stat_f).read_text().splitlines():
                name, _, val = line.partition(" ")
                if name == key:
                    cache = int(val)
            return max(0, int(raw) - max(0, usage - cache))
        except (OSError, ValueError):
            continue
    return None


def check_memory(
    bundle: Bundle,
    *,
    engine: str = "batched",
    max_in_flight: int = 4,
    samples_per_prompt: int = 1,
    device: Device = "auto",
    n_gpu_layers: int | None = None,
) -> MemoryNeed:
    """Refuse, in one sentence with the numbers, a load whose host memory need (:func:`memory_need`)
    exceeds what is free: the OOM killer would otherwise end the process without a word. The
    sentence says how many images in flight would fit, when some would."""
    model = _memory_model(
        bundle, engine=engine, samples_per_prompt=samples_per_prompt, device=device, n_gpu_layers=n_gpu_layers
    )
    need = model.need(max_in_flight)
    avail = available_memory()
    if avail is None or need.total <= avail:
        return need
    detail = ", ".join(f"{k} {v / GiB:.2f}" for k, v in need.parts.items() if v)
    lower = ""
    if engine == "batched" and max_in_flight > 1:
        lo, hi = 0, min(max_in_flight - 1, MAX_SEQUENCES // need.seqs_per_image)
        while lo < hi:  # the most images in flight that fit (the need grows with them)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if model.need(mid).total <= avail else (lo, mid - 1)
        lower = f"lower max_in_flight (at most {lo} fit), " if lo else ""
    cells = f"{need.max_in_flight} images in flight x {need.seqs_per_image} sequences" if engine == "batched" else "1"
    raise InsufficientMemoryError(
        f"not enough memory to load bundle {bundle.name!r}: its models need about {need.total / GiB:.2f} GiB of "
        f"RAM with the {engine} engine, max_in_flight={max_in_flight} and device={device} ({detail} GiB; the KV "
        f"cache holds {cells} x n_ctx {need.n_ctx} cells of {need.kv_bytes_per_cell} bytes) and "
        f"{avail / GiB:.2f} GiB is free; {lower}lower the bundle's n_ctx, offload layers to a GPU "
        "(n_gpu_layers), or free memory"
    )
