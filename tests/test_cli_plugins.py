"""Heavy commands come from plugins; without their extra they fail with the extra's name."""

from __future__ import annotations

import subprocess
import sys

import pytest

HIDE = """
import builtins
real = builtins.__import__
def fake(name, *a, **k):
    if name.split('.')[0] in ('torch', 'peft'):
        raise ModuleNotFoundError("No module named %r" % name, name=name)
    return real(name, *a, **k)
builtins.__import__ = fake
from clue2geo_sdk.cli import main
main({args!r})
"""


@pytest.mark.parametrize(
    ("args", "extra"),
    [(["train", "run", "--help"], "clue2geo[train]"), (["bundle", "demo", "/tmp/x-never-built"], "clue2geo[export]")],
)
def test_missing_extra_is_named(args: list[str], extra: str) -> None:
    r = subprocess.run([sys.executable, "-c", HIDE.format(args=args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-1000:]
    assert extra in r.stderr and "not installed" in r.stderr


def test_runtime_commands_work_without_the_extras() -> None:
    r = subprocess.run([sys.executable, "-c", HIDE.format(args=["bundle", "--help"])], capture_output=True, text=True)
    assert r.returncode == 0 and "verify" in r.stdout
