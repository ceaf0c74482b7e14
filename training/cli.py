"""``clue2geo train dataset|run|export``: found by the runtime CLI through an entry point, so the
runtime never imports torch or this package unless a training command runs. The training stack is
imported here, at load, so a missing [train] extra is reported as such."""

from __future__ import annotations

import json
from pathlib import Path

import click
import peft  # noqa: F401  (fail at plugin load when the [train] extra is missing)
import torch  # noqa: F401
from rich.progress import Progress

from clue2geo_sdk import Geolocator

from .config import StageConfig
from .dataset import build_dataset
from .export import export_trained
from .train import run_stages


@click.group("train")
def train() -> None:
    """Build the fine-tuning data, train the three LoRA stages, export a bundle."""


@train.command("dataset")
@click.option(
    "--csv",
    "csv_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with path, lat, lon (and optionally country, city, landmark).",
)
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--bundle", "teacher", required=True, type=click.Path(path_type=Path), help="Teacher bundle (cues, cluemaps)."
)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--cues",
    type=click.Path(exists=True, path_type=Path),
    help="Precomputed cues JSONL {path, cues:[{cue, description}]}.",
)
@click.option(
    "--reasons",
    type=click.Path(exists=True, path_type=Path),
    help="Reviewed reasoning chains JSONL {path, rc?, rl?}, replacing the teacher's (see the reasons.jsonl written).",
)
@click.option("--val-percent", default=10, show_default=True, type=click.IntRange(0, 90))
@click.option(
    "--reason-tokens", default=512, show_default=True, type=click.IntRange(16), help="Token budget of a teacher chain."
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def dataset_cmd(
    csv_path: Path,
    images: Path,
    teacher: Path,
    out: Path,
    cues: Path | None,
    reasons: Path | None,
    val_percent: int,
    reason_tokens: int,
    device: str,
) -> None:
    """Write rc/rl/ol .train/.val JSONL in the paper's templates, and summary.json."""
    with Geolocator.load(teacher, device=device) as geo, Progress() as progress:
        task = progress.add_task("building", total=None)
        summary = build_dataset(
            csv_path,
            images,
            geo,
            out,
            cues_jsonl=cues,
            reasons_jsonl=reasons,
            val_percent=val_percent,
            reason_tokens=reason_tokens,
            on_row=lambda _: progress.advance(task),
        )
    click.echo(json.dumps({k: summary[k] for k in ("written", "skipped", "sources")}, indent=2))


@train.command("run")
@click.option(
    "--config",
    "configs",
    multiple=True,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="One TOML per stage, in order (training/configs/{rc,rl,ol}.toml).",
)
@click.option(
    "--base",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Base Qwen2.5-VL folder.",
)
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--skip", multiple=True, type=click.Choice(["rc", "rl", "ol"]), help="Skip a stage (the paper's w/o RC/RL/OL)."
)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop each stage after N optimizer steps.")
def run_cmd(
    configs: tuple[Path, ...],
    base: Path,
    data: Path,
    out: Path,
    skip: tuple[str, ...],
    device: str,
    max_steps: int | None,
) -> None:
    """Train the stages in order, each from the previous stage's merged weights."""
    cfgs = [StageConfig.load(c) for c in configs]
    result = run_stages(
        cfgs,
        base,
        data,
        out,
        skip=skip,
        device=device,
        max_steps=max_steps,
        on_step=lambda st, s, loss: click.echo(f"{st} step {s}: loss {loss:.4f}"),
    )
    for s in result["stages"]:
        click.echo(
            f"{s['stage']}: {s['steps']} steps, loss {s['losses'][0]:.4f} -> {s['losses'][-1]:.4f}, "
            f"{s['seconds']:.1f} s"
        )
        if s["skipped_too_long"]["count"]:
            too_long = s["skipped_too_long"]
            click.echo(f"  skipped {too_long['count']} example(s) over max_length: {', '.join(too_long['images'])}")
    click.echo(f"final model: {result['final']}")


@train.command("export")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="trained", show_default=True)
@click.option(
    "--from-bundle", type=click.Path(path_type=Path), help="Copy CLIP, GPSCLIP, SBERT, gallery from this bundle."
)
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Dataset folder (its templates go in the manifest).",
)
@click.option("--quant", default="Q4_K_M", show_default=True)
@click.option("--overwrite", is_flag=True)
def export_cmd(
    model_dir: Path, out: Path, name: str, from_bundle: Path | None, data: Path | None, quant: str, overwrite: bool
) -> None:
    """Merged model -> GGUF + mmproj + the other components -> a verified bundle."""
    b = export_trained(
        model_dir,
        out,
        name=name,
        from_bundle=from_bundle,
        data_summary=data / "summary.json" if data else None,
        quant=quant,
        overwrite=overwrite,
    )
    click.echo(f"bundle {b.name!r} written to {out}")
