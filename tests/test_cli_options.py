"""The pipeline options are declared once, in Options: `locate` and `eval` have one flag per field,
whose default is the field's (so a default changed in Options is the CLI's too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import click
import pytest

from clue2geo_sdk.cli import main
from clue2geo_sdk.cli.flags import option_flag
from clue2geo_sdk.options import Options

FIELDS = attrs.fields(Options)


def _command(name: str) -> click.Command:
    cmd = main.get_command(click.Context(main), name)
    assert cmd is not None
    return cmd


def _options(name: str) -> dict[str, click.Option]:
    return {p.name: p for p in _command(name).params if isinstance(p, click.Option) and p.name}


def _parsed(name: str, args: list[str]) -> dict[str, Any]:
    return _command(name).make_context(name, args).params


def _required(name: str, tmp_path: Path) -> list[str]:
    if name == "locate":
        return ["photo.jpg", "--bundle", "b", "--out", "r.jsonl"]
    (tmp_path / "m.csv").write_text("IMG_ID,LAT,LON\n")
    return ["--dataset", str(tmp_path / "m.csv"), "--images", str(tmp_path), "--bundle", "b", "--out", "o"]


@pytest.mark.parametrize("command", ["locate", "eval"])
@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_every_option_is_a_flag_with_the_fields_default(command: str, field: attrs.Attribute[Any]) -> None:
    flag = _options(command)[field.name]
    assert "--" + field.name.replace("_", "-") in flag.opts
    assert flag.default == getattr(attrs.fields(Options), field.name).default


@pytest.mark.parametrize("command", ["locate", "eval"])
def test_no_flags_give_the_default_options(command: str, tmp_path: Path) -> None:
    params = _parsed(command, _required(command, tmp_path))
    assert Options(**{f.name: params[f.name] for f in FIELDS}) == Options()


@pytest.mark.parametrize("command", ["locate", "eval"])
def test_flags_reach_the_options(command: str, tmp_path: Path) -> None:
    args = [
        *_required(command, tmp_path),
        *("--no-use-cluemap", "--references", "5,10", "--samples-per-prompt", "3", "--sample-temperature", "0.2"),
        *("--nearest-neighbour-candidate", "--constrain", "never", "--alpha", "0.25", "--max-cue-tokens", "64"),
        *("--max-answer-tokens", "32", "--region", "FR,DE", "--no-use-refinement", "--image-tokens", "256"),
    ]
    params = _parsed(command, args)
    opts = Options(**{f.name: params[f.name] for f in FIELDS})
    assert opts.to_dict() | {"region": None} == {
        "use_cluemap": False,
        "use_refinement": False,
        "references": [5, 10],
        "samples_per_prompt": 3,
        "sample_temperature": 0.2,
        "nearest_neighbour_candidate": True,
        "constrain": "never",
        "alpha": 0.25,
        "max_cue_tokens": 64,
        "max_answer_tokens": 32,
        "image_tokens": 256,
        "region": None,
    }
    assert opts.region is not None and opts.region.to_dict() == Options(region="FR,DE").region.to_dict()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "args",
    [
        ["--references", "5,x"],
        ["--alpha", "1.5"],
        ["--max-cue-tokens", "15"],
        ["--constrain", "sometimes"],
        ["--image-tokens", "4097"],
    ],
)
def test_a_value_the_flag_refuses_is_a_usage_error(args: list[str]) -> None:
    with pytest.raises(click.BadParameter):
        _parsed("locate", ["photo.jpg", "--bundle", "b", "--out", "r.jsonl", *args])


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: f.name)
def test_a_changed_default_in_options_is_the_flags_default(field: attrs.Attribute[Any]) -> None:
    """The flag is made from the field: give the field another default and the flag has it."""
    other = {bool: lambda d: not d, int: lambda d: d + 7, float: lambda d: d / 2, tuple: lambda d: (*d, 20)}
    new = next((f(field.default) for t, f in other.items() if isinstance(field.default, t)), "always")
    if field.name == "constrain":
        new = "never"
    elif field.default is None:
        new = "FR"
    changed = field.evolve(default=new)
    cmd = click.command()(option_flag(changed)(lambda **kw: None))
    (param,) = cmd.params
    assert param.default == new != field.default
