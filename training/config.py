"""One config file per stage (TOML), read into a frozen, typed config; unknown keys are refused.

There is no image-size key: the image-token budget is the one inference uses (the dataset's
``image_max_tokens``, see ``clue2geo_sdk.engines.image_tokens``), so training cannot drift from it."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

# LoRA only on the language model's attention and MLP projections (a plain name list would also
# hit the vision tower's MLPs; DESIGN §4).
LM_TARGETS = r".*language_model.*\.(q|k|v|o|gate|up|down)_proj"


@attrs.frozen(kw_only=True)
class StageConfig:
    """One stage's LoRA, optimizer and schedule settings, as its TOML file gives them."""

    stage: str = attrs.field(validator=attrs.validators.in_(("rc", "rl", "ol")))
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    lr: float = 1e-4
    epochs: int = 1
    batch: int = 1
    grad_accum: int = 8
    max_length: int = 2048  # longer examples are skipped and listed in the run report
    target_modules: str = LM_TARGETS
    seed: int = 0
    save_every: int = 50
    gradient_checkpointing: bool = True  # used on CUDA only

    @classmethod
    def load(cls, path: str | Path) -> StageConfig:
        """Read a stage TOML; an unknown key is refused rather than ignored (a typo would train silently)."""
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The settings as stored in state.json, where a resumed stage checks them."""
        return attrs.asdict(self)
