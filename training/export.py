"""Trained model -> bundle: the VLM exported to GGUF + mmproj with the templates and image-token
budget it was trained on; the other components copied (and verified) from an existing bundle, or
built afresh."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from clue2geo_sdk.bundle.components import ATTACHED_ROLES
from clue2geo_sdk.bundle.manifest import Bundle
from clue2geo_sdk.bundle.writer import BundleWriter
from clue2geo_sdk.engines.image_tokens import IMAGE_MAX_TOKENS
from clue2geo_sdk.pipeline.prompts import DEFAULT_PROMPTS
from exporters import vlm_gguf
from exporters.bundle_builder import build_bundle, vlm_params


def _summary(data_summary: Path | None) -> dict[str, Any]:
    if data_summary is None or not data_summary.exists():
        return {}
    return dict(json.loads(data_summary.read_text(encoding="utf-8")))


def trained_templates(data_summary: Path | None) -> dict[str, str]:
    """The prompt templates the dataset builder wrote (so inference asks what training taught)."""
    return dict(_summary(data_summary).get("templates", {}))


def trained_image_tokens(data_summary: Path | None) -> int:
    """The image-token budget training used (so inference shows the model the same image size)."""
    return int(_summary(data_summary).get("image_max_tokens") or IMAGE_MAX_TOKENS)


def export_trained(
    model_dir: Path,
    out: Path,
    *,
    name: str,
    from_bundle: Path | None = None,
    data_summary: Path | None = None,
    quant: str = "Q4_K_M",
    overwrite: bool = False,
) -> Bundle:
    prompts = trained_templates(data_summary)
    if from_bundle is None:
        return build_bundle(
            out,
            name=name,
            qwen_dir=model_dir,
            clip_model=None,
            clip_vision_dir=None,
            quant=quant,
            overwrite=overwrite,
            prompts=prompts,
        )
    src = Bundle.open(from_bundle, verify=True)
    writer = BundleWriter(out, name=name, demo=False, overwrite=overwrite)
    with writer:  # a failed export removes its build folder; ``out`` is untouched until write()
        vlm = vlm_gguf.export_vlm(model_dir, writer.root / "vlm", quant=quant)
        params: dict[str, Any] = vlm_params(quant, vlm["check"])
        params["prompts"] = {**DEFAULT_PROMPTS, **prompts}
        params["image_max_tokens"] = trained_image_tokens(data_summary)
        writer.add(
            "vlm",
            {"model": vlm["model"], "mmproj": vlm["mmproj"]},
            params=params,
            provenance={"source": str(model_dir), "trained": True, "data": str(data_summary) if data_summary else None},
        )
        random_parts = []
        for role, comp in src.components.items():
            if role == "vlm" or role in ATTACHED_ROLES:  # a validation or known answers of other models
                continue
            files = {}
            for key, f in comp.files.items():
                dst = writer.root / f.path
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src.root / f.path, dst)
                files[key] = dst
            writer.add(
                role,
                files,
                params=comp.params,
                provenance={**comp.provenance, "copied_from": src.name},
                random_weights=comp.random_weights,
            )
            if comp.random_weights:
                random_parts.append(role)
        writer.demo = bool(random_parts)
        writer.extra = {"random_components": random_parts}
        writer.write()
    return Bundle.open(out, verify=True)
