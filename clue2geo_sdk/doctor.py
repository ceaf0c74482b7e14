"""``clue2geo doctor``: what a support request needs (filled in by the hardening work)."""

from __future__ import annotations

import click


@click.command("doctor")
def doctor_cmd() -> None:
    """Print this machine's CPU features, llama.cpp build, ONNX Runtime providers and memory."""
    raise click.ClickException("not implemented yet")
