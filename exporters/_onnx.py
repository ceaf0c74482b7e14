"""torch -> ONNX with the TorchScript exporter, dynamic batch axis, then reload for checking."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

OPSET = 17


def export_module(
    module,  # torch.nn.Module
    example_inputs: tuple,
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> Path:
    import torch

    module.eval()
    axes = {n: {0: "batch"} for n in [*input_names, *output_names]}
    # nn.MultiheadAttention's fused inference path has no ONNX symbolic; trace the plain path.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                example_inputs,
                str(path),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
