"""Flags that more than one command takes, each declared once: the pipeline's :class:`Options` (one
flag per field, generated from the field, so a default changed in Options is the CLI's default too),
how the Geolocator is loaded (engine, device, in-flight images, gallery), and the bundle's trust."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args

import attrs
import click

from ..engines import ENGINES
from ..engines.encoders import Device
from ..geolocator import Geolocator
from ..options import Options, flag_of

F = TypeVar("F", bound=Callable[..., Any])

TRUSTED_KEY_HELP = (
    "Ed25519 public key (PEM, 'ssh-ed25519' line or 64 hex, or its file) the bundle must be signed by; repeatable."
)
_LOAD_DEFAULTS = {name: p.default for name, p in inspect.signature(Geolocator.load).parameters.items()}


class CountList(click.ParamType):
    """A comma list of whole numbers ("5,10,15") as a tuple; whether each count is allowed is Options' to say."""

    name = "counts"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):  # the default, already a tuple
            return value
        try:
            return tuple(int(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma list of whole numbers, e.g. 5,10,15", param, ctx)


def option_flag(field: attrs.Attribute[Any]) -> Callable[[F], F]:
    """The click option of one Options field: ``--kebab-name``, the field's default, its Flag's help
    and range; a bool a ``--x/--no-x`` switch (or an on-only ``--x``), a tuple of counts a comma list."""
    fl = flag_of(field)
    name = "--" + field.name.replace("_", "-")
    kw: dict[str, Any] = {"default": field.default, "show_default": True, "help": fl.help}
    if fl.metavar is not None:
        kw["metavar"] = fl.metavar
    if isinstance(field.default, bool):
        decl = f"{name}/--no-{name[2:]}" if fl.switch else name
        return click.option(decl, field.name, is_flag=True, **kw)
    if fl.choices is not None:
        kw["type"] = click.Choice(list(fl.choices))
    elif isinstance(field.default, int):
        bounded = fl.low is not None or fl.high is not None
        kw["type"] = click.IntRange(fl.low, fl.high) if bounded else click.INT
    elif isinstance(field.default, float):
        kw["type"] = click.FloatRange(fl.low, fl.high)
    elif isinstance(field.default, tuple):
        kw["type"] = CountList()
    else:
        kw["type"] = click.STRING
    return click.option(name, field.name, **kw)


def options_flags(f: F) -> F:
    """One flag per :class:`Options` field, in the fields' order (the command gets them as ``**options``)."""
    for field in reversed(attrs.fields(Options)):
        f = option_flag(field)(f)
    return f


def engine_flags(f: F) -> F:
    """--engine, --in-flight, --device and --threads, with ``Geolocator.load``'s defaults."""
    f = click.option(
        "--threads",
        "n_threads",
        default=None,
        type=click.IntRange(1),
        help="llama.cpp CPU threads [default: the physical cores this process may use, within its CPU quota]. "
        "Fewer on a busy machine: more threads than free cores make ggml's threads wait for each other.",
    )(f)
    f = click.option(
        "--device", type=click.Choice(list(get_args(Device))), default=_LOAD_DEFAULTS["device"], show_default=True
    )(f)
    f = click.option(
        "--in-flight",
        "max_in_flight",
        default=_LOAD_DEFAULTS["max_in_flight"],
        show_default=True,
        type=click.IntRange(1),
        help="Images in the engine at once (each reserves its KV cache).",
    )(f)
    return click.option(
        "--engine",
        type=click.Choice(list(ENGINES)),
        default=_LOAD_DEFAULTS["engine"],
        show_default=True,
        help="VLM engine: batched (shared image prefix, many images at once) or the chat-handler baseline.",
    )(f)


def gallery_flag(f: F) -> F:
    return click.option(
        "--gallery",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Reference gallery of your own geotagged photos (clue2geo gallery build) instead of the bundle's.",
    )(f)


def trusted_key_flag(f: F) -> F:
    return click.option("--trusted-key", "trusted_keys", multiple=True, help=TRUSTED_KEY_HELP)(f)


@attrs.frozen(kw_only=True)
class LoadSettings:
    """What the flags say about loading the Geolocator: the bundle and its trust, engine, device,
    images in flight, gallery and the pipeline options."""

    bundle_path: Path
    device: str
    engine: str
    max_in_flight: int
    verify: bool
    trusted_keys: tuple[str, ...]
    gallery: Path | None
    options: dict[str, Any]
    verbose: bool = False
    n_threads: int | None = None

    @classmethod
    def from_command(cls, options: dict[str, Any]) -> LoadSettings:
        """The running command's own flags (its bundle, :func:`engine_flags`, :func:`gallery_flag`,
        ``--verify``, :func:`trusted_key_flag`, ``--verbose`` where it has one) with its Options flags."""
        params = click.get_current_context().params
        named = {f.name: params[f.name] for f in attrs.fields(cls) if f.name != "options" and f.name in params}
        return cls(options=options, **named)

    def load(self) -> Geolocator:
        """``Geolocator.load`` with these settings (errors are the caller's to report)."""
        return Geolocator.load(
            self.bundle_path,
            device=self.device,  # type: ignore[arg-type]
            verify=self.verify,
            verbose=self.verbose,
            engine=self.engine,  # type: ignore[arg-type]
            max_in_flight=self.max_in_flight,
            trusted_keys=self.trusted_keys or None,
            gallery=self.gallery,
            n_threads=self.n_threads,
            **self.options,
        )
