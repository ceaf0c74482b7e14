"""torch -> ONNX with the TorchScript exporter, dynamic batch axis, then reload for checking.

ONNX files are protobufs, which cannot exceed 2 GiB: a tower whose weights pass
``external_data_above`` bytes (default: the limit less 64 MiB of headroom for the graph) is written
as ``NAME.onnx`` (graph) + ``NAME.onnx.data`` (every initializer of 1 KiB or more, at 64 KiB-aligned
offsets so onnxruntime can map them). The bundle lists both files; onnxruntime finds the data file
beside the graph. :func:`onnx_files` names them for the manifest.

fp16 variants (for GPUs) come from onnxruntime's float16 converter with float32 inputs and outputs
and are kept only when they reproduce the float32 reference (:func:`fp16_variant`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OPSET = 17
PROTOBUF_LIMIT = 2**31
EXTERNAL_DATA_ABOVE = PROTOBUF_LIMIT - (64 << 20)
DATA_ALIGN = 1 << 16  # 64 KiB: the mmap granularity on Windows, a multiple of Linux pages
_MIN_EXTERNAL_TENSOR = 1024
# fp16 variants are checked (and meant to run) at this onnxruntime optimization level: on
# onnxruntime 1.32's CPU provider, ORT_ENABLE_ALL segfaults while creating a session for a
# float16-converted ViT (NchwcTransformer together with MatmulTransposeFusion).
FP16_GRAPH_OPTIMIZATION = "extended"
FP16_MIN_COSINE = 0.999


def data_file(path: Path) -> Path:
    """Where the external weights of ``path`` live (``image.onnx`` -> ``image.onnx.data``)."""
    return path.with_name(path.name + ".data")


def onnx_files(key: str, path: Path) -> dict[str, Path]:
    """Manifest entries for one ONNX model: ``{key: graph}`` plus ``{key_data: weights}`` when external."""
    out = {key: path}
    if data_file(path).is_file():
        out[f"{key}_data"] = data_file(path)
    return out


def save_onnx(model: Any, path: Path, *, external_data_above: int = EXTERNAL_DATA_ABOVE) -> list[Path]:
    """Write an in-memory ``onnx.ModelProto`` (weights loaded) as one file, or graph + aligned data file."""
    # export extra: onnx only when a model is written (tests import this module's helpers without it)
    import onnx
    from onnx.external_data_helper import set_external_data  # with the line above

    data = data_file(path)
    data.unlink(missing_ok=True)
    path.unlink(missing_ok=True)
    weights = sum(len(t.raw_data) for t in model.graph.initializer if t.HasField("raw_data"))
    if weights <= external_data_above:
        onnx.save_model(model, str(path))
        return [path]
    offset = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) >= _MIN_EXTERNAL_TENSOR:
            offset = -(-offset // DATA_ALIGN) * DATA_ALIGN
            set_external_data(t, data.name, offset=offset, length=len(t.raw_data))
            offset += len(t.raw_data)
    onnx.save_model(model, str(path))  # writes each marked tensor's bytes at its offset, then drops them
    shutil.copymode(path, data)  # onnx creates the data file 0600; give it the graph's (umask) mode
    return [path, data]


def export_module(
    module,  # torch.nn.Module
    example_inputs: tuple,
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    external_data_above: int = EXTERNAL_DATA_ABOVE,
) -> Path:
    """Export to ``path`` (and ``path.data`` when the weights pass ``external_data_above`` bytes)."""
    import torch  # export extra: this module's ONNX helpers are used without torch

    module.eval()
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
    path.parent.mkdir(parents=True, exist_ok=True)
    data_file(path).unlink(missing_ok=True)
    # torch writes a model over 2 GiB as one file per tensor beside the graph: export into a scratch
    # folder on the same disk, then lay the weights out as this module's single data file.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-export-") as tmp:
        raw = Path(tmp) / path.name
        # nn.MultiheadAttention's fused inference path has no ONNX symbolic; trace the plain path.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    example_inputs,
                    str(raw),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes=axes,
                    opset_version=OPSET,
                    dynamo=False,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        written = list(Path(tmp).iterdir())
        if written == [raw] and raw.stat().st_size <= external_data_above:
            shutil.move(str(raw), str(path))
        else:
            import onnx  # export extra: only for a model torch wrote as many files

            save_onnx(onnx.load(str(raw)), path, external_data_above=external_data_above)
    return path


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort  # native library: imported at first use (load order: clue2geo_sdk._native)

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


_ISOLATED = """
import sys, numpy as np, onnxruntime as ort
path, feeds, out, level = sys.argv[1:5]
opts = ort.SessionOptions()
opts.log_severity_level = 3
opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
res = sess.run(None, dict(np.load(feeds)))
np.savez(out, *res)
"""


def run_onnx_isolated(
    path: Path, feeds: Mapping[str, np.ndarray], *, level: str = "all", timeout: float = 1800
) -> tuple[list[np.ndarray] | None, str]:
    """Run a model in a child process, so a crash in onnxruntime (seen with fp16 graphs) cannot end
    the export; returns (outputs, "") or (None, what went wrong)."""
    with tempfile.TemporaryDirectory(prefix="c2g-ort-") as tmp:
        fin, fout = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(fin, **dict(feeds))
        cmd = [sys.executable, "-c", _ISOLATED, str(path), str(fin), str(fout), level]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"onnxruntime did not finish within {timeout:.0f} s"
        if res.returncode != 0:
            why = f"signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
            tail = (res.stderr or "").strip().splitlines()[-1:] or [""]
            return None, f"onnxruntime failed ({why}) {tail[0][-300:]}".strip()
        with np.load(fout) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))], ""


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    return (a * b).sum(1) / np.clip(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30, None)


def fp16_variant(
    src: Path,
    dst: Path,
    feeds: Mapping[str, np.ndarray],
    reference: np.ndarray,
    *,
    min_cosine: float = FP16_MIN_COSINE,
    external_data_above: int = EXTERNAL_DATA_ABOVE,
) -> dict[str, Any]:
    """float16 copy of ``src`` (float32 I/O) kept only if each output row's cosine to ``reference``
    (the torch model on ``feeds``) is at least ``min_cosine``; otherwise its files are removed.

    Returns ``{"ok", "files", "cos_min", "max_abs_diff", "graph_optimization"}`` or ``{"ok": False, "reason"}``.
    """
    # export extra (onnx) and onnxruntime's converter: only when a float16 variant is made
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16  # with the line above

    model = onnx.load(str(src))
    # shape inference serializes the model: impossible past 2 GiB, so the converter goes without it
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    del model
    save_onnx(half, dst, external_data_above=external_data_above)
    del half
    outs, err = run_onnx_isolated(dst, feeds, level=FP16_GRAPH_OPTIMIZATION)
    verdict: dict[str, Any] = {"graph_optimization": FP16_GRAPH_OPTIMIZATION, "min_cosine": min_cosine}
    if outs is None:
        verdict.update(ok=False, reason=err)
    else:
        got = np.asarray(outs[0], dtype=np.float64)
        ref = np.asarray(reference, dtype=np.float64)
        if got.shape != ref.shape:
            verdict.update(ok=False, reason=f"output shape {got.shape} != reference {ref.shape}")
        else:
            cos = _cosines(ref, got)
            cos_min = float(np.min(cos)) if np.all(np.isfinite(cos)) else float("nan")
            verdict.update(cos_min=cos_min, max_abs_diff=float(np.max(np.abs(got - ref))))
            verdict["ok"] = bool(cos_min >= min_cosine)
            if not verdict["ok"]:
                verdict["reason"] = f"min cosine to the float32 reference {cos_min:.6f} < {min_cosine}"
    if verdict["ok"]:
        verdict["files"] = [p.name for p in (dst, data_file(dst)) if p.is_file()]
    else:
        dst.unlink(missing_ok=True)
        data_file(dst).unlink(missing_ok=True)
    return verdict


def fp16_variants(
    out_dir: Path,
    towers: Mapping[str, tuple[Path, Mapping[str, np.ndarray], np.ndarray]],
    files: dict[str, Path],
    *,
    external_data_above: int = EXTERNAL_DATA_ABOVE,
) -> dict[str, dict[str, Any]]:
    """For each tower ``key: (graph, feeds, float32 reference)`` a float16 copy ``KEY_fp16.onnx`` in
    ``out_dir`` (:func:`fp16_variant`); those that pass parity are added to ``files``. Returns each
    tower's verdict without its file list: the component's ``params["fp16"]``."""
    verdicts: dict[str, dict[str, Any]] = {}
    for key, (path, feeds, reference) in towers.items():
        dst = out_dir / f"{key}_fp16.onnx"
        verdict = fp16_variant(path, dst, feeds, reference, external_data_above=external_data_above)
        verdicts[key] = {k: v for k, v in verdict.items() if k != "files"}
        if verdict["ok"]:
            files.update(onnx_files(f"{key}_fp16", dst))
    return verdicts
