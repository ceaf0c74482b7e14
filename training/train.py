"""The three LoRA stages (RC -> RL -> OL) on Qwen2.5-VL with transformers + peft.

Each stage starts from the previous stage's merged weights (or the base model), trains LoRA on the
language model only, masks the loss on everything but the assistant's answer, skips (and reports)
examples longer than ``max_length`` rather than aborting, checkpoints
(adapter + optimizer + state.json with config, step and base-model digest) and resumes an
interrupted stage from its last checkpoint. Finally it merges the adapter into a plain Hugging Face
folder that the VLM exporter converts.

Images are resized with the runtime's own :func:`fit_image` to the image-token budget that inference
uses (the dataset's ``image_max_tokens``, from the teacher bundle), and the processor is given the
same bounds so it does not resize again: the model trains on exactly the tokens it will see.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from clue2geo_sdk.engines.image_tokens import FACTOR, IMAGE_MAX_TOKENS, IMAGE_MIN_TOKENS, fit_image
from clue2geo_sdk.files import sha256_file
from clue2geo_sdk.inputs.image import load_image
from exporters.qwen_vl import write_architectures

from .config import StageConfig

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
HF_EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)


def model_digest(folder: Path) -> str:
    """sha256 over the model's safetensors files (names and digests), to tie checkpoints to their base."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One object per non-blank line: the dataset builder's record files."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TooLongError(ValueError):
    """An example with more tokens than the stage's ``max_length``: skipped and reported, not fatal."""


def image_budget(data: Path) -> int:
    """The image-token budget recorded by the dataset builder (the teacher bundle's), else the default."""
    summary = data / "summary.json"
    if summary.exists():
        return int(json.loads(summary.read_text(encoding="utf-8")).get("image_max_tokens") or IMAGE_MAX_TOKENS)
    return IMAGE_MAX_TOKENS


def load_processor(base: Path, image_max_tokens: int) -> Any:
    """The model's processor with pixel bounds equal to the budget, so an image already sized by
    :func:`fit_image` passes through unchanged (its smart-resize is then the identity)."""
    lo, hi = IMAGE_MIN_TOKENS * FACTOR * FACTOR, image_max_tokens * FACTOR * FACTOR
    # Both spellings: transformers keeps ``size`` and ``min/max_pixels`` apart and reads either.
    return AutoProcessor.from_pretrained(
        str(base), min_pixels=lo, max_pixels=hi, size={"shortest_edge": lo, "longest_edge": hi}
    )


def encode_example(
    processor: Any, rec: dict[str, Any], *, max_length: int, image_max_tokens: int
) -> dict[str, torch.Tensor]:
    """Tokenize one record; labels are -100 except on the answer and its closing <|im_end|>."""
    user, assistant = rec["messages"]
    prompt = next(c["text"] for c in user["content"] if c["type"] == "text")
    img = fit_image(load_image(rec["image"]).image, image_max_tokens)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    head = f"{SYSTEM}<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n"
    # The sequence ends at <|im_end|>: the newline a chat template puts after it is never generated,
    # so it would only add a label that teaches nothing.
    answer = assistant["content"] + "<|im_end|>"
    enc = processor(text=[head + answer], images=[img], return_tensors="pt")
    n = enc["input_ids"].shape[1]
    if n > max_length:
        raise TooLongError(f"{rec['image']}: {n} tokens exceed max_length {max_length}")
    # The answer follows a newline, where Qwen2's pre-tokenizer always splits, so its tokens are the
    # sequence's tail: tokenizing it alone finds the boundary without preprocessing the image twice.
    answer_ids = processor.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if not torch.equal(enc["input_ids"][0, -len(answer_ids) :], answer_ids):
        raise ValueError(f"{rec['image']}: the answer's tokens are not the tail of the encoded example")
    labels = enc["input_ids"].clone()
    labels[:, : -len(answer_ids)] = -100
    return {**enc, "labels": labels}


def finalize_hf_folder(src: Path, dst: Path) -> None:
    """Copy tokenizer / processor files and write ``architectures`` at the top of config.json."""
    for name in HF_EXTRA_FILES:
        if (src / name).exists() and not (dst / name).exists():
            shutil.copy(src / name, dst / name)
    write_architectures(dst)


@attrs.define(kw_only=True)
class _StageRun:
    """What one stage's loop works on, kept together so each step of the loop takes one argument."""

    cfg: StageConfig
    model: Any  # a peft model over Qwen2.5-VL
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    processor: Any
    device: str
    budget: int
    ckpt: Path
    state: dict[str, Any]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def _stage_records(cfg: StageConfig, data: Path) -> list[dict[str, Any]]:
    """The stage's training records; an empty file is an error, not a stage that trains nothing."""
    path = data / f"{cfg.stage}.train.jsonl"
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path} has no training records")
    return records


def _lora_model(cfg: StageConfig, base: Path, device: str, dtype: torch.dtype) -> Any:
    """The base model with LoRA on the config's targets (gradient checkpointing on CUDA only, where
    memory is the limit; on CPU it would only slow the small runs down)."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(base), dtype=dtype).to(device)
    if device == "cuda" and cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def _fresh_state(cfg: StageConfig, base: Path, digest: str, budget: int) -> dict[str, Any]:
    """state.json of a stage not yet started: what a checkpoint must match to be resumed."""
    return {
        "stage": cfg.stage,
        "step": 0,
        "config": cfg.to_dict(),
        "base": str(base),
        "base_digest": digest,
        "image_max_tokens": budget,
        "losses": [],
        "too_long": [],
    }


def _resume(ckpt: Path, model: Any, opt: torch.optim.Optimizer, fresh: dict[str, Any]) -> dict[str, Any]:
    """Load the adapter and optimizer of ``ckpt`` if there is one, and return its state (else ``fresh``).
    A checkpoint of another base model, config or image budget is refused: resuming it would train
    a mix of two runs."""
    if not (ckpt / "state.json").exists():
        return fresh
    saved = json.loads((ckpt / "state.json").read_text())
    if (
        saved["base_digest"] != fresh["base_digest"]
        or saved["config"] != fresh["config"]
        or saved.get("image_max_tokens") != fresh["image_max_tokens"]
    ):
        raise ValueError(
            f"{ckpt}: checkpoint was made from another base model, config or image budget; remove it to start over"
        )
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return saved


def _save_checkpoint(model: Any, opt: torch.optim.Optimizer, state: dict[str, Any], ckpt: Path) -> None:
    """Write the checkpoint beside the old one and swap it in, so an interruption leaves one whole."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    if ckpt.exists():
        shutil.rmtree(ckpt)
    tmp.rename(ckpt)


def _micro_batch(records: list[dict[str, Any]], cfg: StageConfig, micro: int, per_epoch: int) -> list[dict[str, Any]]:
    """The records of micro-step ``micro``. The order is a shuffle seeded by the epoch, so it is a
    function of the step alone and a resumed stage sees the batches an uninterrupted one would."""
    epoch, pos = divmod(micro, per_epoch)
    order = list(range(len(records)))
    random.Random(cfg.seed + epoch).shuffle(order)
    return [records[i] for i in order[pos * cfg.batch : (pos + 1) * cfg.batch]]


def _encode_batch(run: _StageRun, batch: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Encode a micro-batch, leaving out examples over ``max_length``; they are remembered in the
    state, so they are reported and not encoded again."""
    examples = []
    for rec in batch:
        if rec["image"] in run.state["too_long"]:
            continue
        try:
            examples.append(
                encode_example(run.processor, rec, max_length=run.cfg.max_length, image_max_tokens=run.budget)
            )
        except TooLongError:
            run.state["too_long"].append(rec["image"])
    return examples


def _backward(run: _StageRun, examples: list[dict[str, torch.Tensor]]) -> float:
    """Accumulate the gradients of a micro-batch, scaled so that an optimizer step averages over all of
    its examples; return the micro-batch's mean loss."""
    loss_sum = 0.0
    for enc in examples:
        ex = {k: v.to(run.device) for k, v in enc.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.cuda):
            loss = run.model(**ex).loss / (len(examples) * run.cfg.grad_accum)
        loss.backward()
        loss_sum += float(loss.detach()) * run.cfg.grad_accum
    return loss_sum


def _optimizer_step(
    run: _StageRun, micro: int, total_micro: int, window: list[float], on_step: Callable[[int, float], None] | None
) -> None:
    """Clip, step, record the step's mean loss and checkpoint every ``save_every`` steps and at the end."""
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    state = run.state
    state["step"] = math.ceil(micro / run.cfg.grad_accum)
    if window:  # a step whose examples were all too long has no loss
        state["losses"].append(round(sum(window) / len(window), 6))
        if on_step:
            on_step(state["step"], state["losses"][-1])
    if state["step"] % run.cfg.save_every == 0 or micro == total_micro:
        _save_checkpoint(run.model, run.opt, state, run.ckpt)


def _train_loop(
    run: _StageRun,
    records: list[dict[str, Any]],
    max_steps: int | None,
    on_step: Callable[[int, float], None] | None,
) -> None:
    """Micro-batches from the state's step to the end (``epochs``, or ``max_steps`` optimizer steps)."""
    cfg = run.cfg
    per_epoch = math.ceil(len(records) / cfg.batch)
    total_micro = per_epoch * cfg.epochs
    if max_steps is not None:
        total_micro = min(total_micro, max_steps * cfg.grad_accum)
    run.model.train()
    micro = run.state["step"] * cfg.grad_accum
    window: list[float] = []
    while micro < total_micro:
        examples = _encode_batch(run, _micro_batch(records, cfg, micro, per_epoch))
        loss_sum = _backward(run, examples)
        if examples:
            window.append(loss_sum)
        micro += 1
        if micro % cfg.grad_accum == 0 or micro == total_micro:
            _optimizer_step(run, micro, total_micro, window, on_step)
            window = []


def _merge(model: Any, base: Path, merged_dir: Path, dtype: torch.dtype) -> None:
    """Fold the adapter into the weights and write a plain Hugging Face folder for the VLM exporter."""
    merged = model.merge_and_unload()
    merged.to(dtype).save_pretrained(str(merged_dir), safe_serialization=True)
    finalize_hf_folder(base, merged_dir)


def train_stage(
    cfg: StageConfig,
    base: Path,
    data: Path,
    out: Path,
    *,
    device: str = "cpu",
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train one stage on ``data/<stage>.train.jsonl``; write ``out/merged``; return losses and timing."""
    out.mkdir(parents=True, exist_ok=True)
    records = _stage_records(cfg, data)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    budget = image_budget(data)
    processor = load_processor(base, budget)
    model = _lora_model(cfg, base, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    digest = model_digest(base)
    ckpt = out / "checkpoint"
    state = _resume(ckpt, model, opt, _fresh_state(cfg, base, digest, budget))
    run = _StageRun(
        cfg=cfg,
        model=model,
        opt=opt,
        params=params,
        processor=processor,
        device=device,
        budget=budget,
        ckpt=ckpt,
        state=state,
    )
    t0 = time.perf_counter()
    _train_loop(run, records, max_steps, on_step)
    seconds = time.perf_counter() - t0
    if not state["losses"]:
        raise TooLongError(f"{cfg.stage}: every example exceeds max_length {cfg.max_length}; raise it in the config")
    merged_dir = out / "merged"
    _merge(model, base, merged_dir, dtype)
    summary = {
        "stage": cfg.stage,
        "steps": state["step"],
        "losses": state["losses"],
        "seconds": round(seconds, 2),
        "base_digest": digest,
        "merged": str(merged_dir),
        "records": len(records),
        "image_max_tokens": budget,
        "skipped_too_long": {"count": len(state["too_long"]), "images": [Path(i).name for i in state["too_long"]]},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_stages(
    configs: Sequence[StageConfig],
    base: Path,
    data: Path,
    out: Path,
    *,
    skip: Sequence[str] = (),
    device: str = "cpu",
    max_steps: int | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> dict[str, Any]:
    """RC -> RL -> OL (any skippable): each from the previous merged model. ``out/final`` is the last one."""
    current = base
    summaries = []
    for cfg in configs:
        if cfg.stage in skip:
            continue
        stage_out = out / cfg.stage
        summary = train_stage(
            cfg,
            current,
            data,
            stage_out,
            device=device,
            max_steps=max_steps,
            on_step=(lambda s, loss, st=cfg.stage: on_step(st, s, loss)) if on_step else None,
        )
        summaries.append(summary)
        current = Path(summary["merged"])
    final = out / "final"
    if final.is_symlink() or final.exists():
        final.unlink() if final.is_symlink() else shutil.rmtree(final)
    shutil.copytree(current, final)
    result = {
        "stages": summaries,
        "skipped": list(skip),
        "skipped_too_long": {s["stage"]: s["skipped_too_long"] for s in summaries},
        "final": str(final),
        "templates_from": str(data / "summary.json"),
    }
    (out / "run.json").write_text(json.dumps(result, indent=2))
    return result
