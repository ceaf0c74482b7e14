"""Options: the one declaration of every pipeline switch, its default and its validation.

Checked when built (type, range, finite), so a bad value is refused by name before any image is read;
the CLI's flags are generated from these fields (``cli/flags.py``): each field's :class:`Flag` says
what the command line adds to it (help, the range click checks), its name and default are the field's."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import attrs
import numpy as np

from .errors import Clue2GeoError, OptionsError
from .geo.region import Region

CONSTRAIN_CHOICES = ("fallback", "always", "never")
MAX_REFERENCES = 1000  # gallery points shown to one RAG prompt; far above the paper's 15
MAX_SAMPLES = 32
MAX_GENERATION_TOKENS = 1 << 20  # far above any context; the engine refuses what its context cannot hold
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 8, 4096  # llama.cpp's range for Qwen2.5-VL's image tokens
CLI_MIN_TOKENS = 16  # the CLI's floor for the token budgets (Python callers may go down to 1)
FLAG = "flag"  # the metadata key of a field's Flag
LATER_OPTIONS = ("image_tokens",)  # added after 0.1's first records: in the digest only when set


@attrs.frozen(kw_only=True)
class Flag:
    """An Options field's face on the command line: ``--kebab-name`` with the field's default; a bool is
    ``--x/--no-x`` (``switch``) or an on-only ``--x``; a tuple of counts is a comma list. ``low``/``high``
    are the range click checks before Options does: the token budgets keep the CLI's floor of 16, and a
    bound left out here is Options' to refuse (by name, exit 1), so the two never disagree on a value
    both check."""

    help: str | None = None
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    switch: bool = True
    metavar: str | None = None


def flag(**kwargs: Any) -> dict[str, Flag]:
    """A field's metadata holding its :class:`Flag`."""
    return {FLAG: Flag(**kwargs)}


def flag_of(field: attrs.Attribute[Any]) -> Flag:
    """The :class:`Flag` of an Options field (every field declares one)."""
    found: Flag = field.metadata[FLAG]
    return found


def whole_number(value: Any) -> bool:
    """An int (numpy's too) and not a bool: what every count setting must be."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _opt_bool(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionsError(f"option {attr.name}={value!r}: must be True or False")


def _opt_int(low: int, high: int | None = None) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if not whole_number(value):
            raise OptionsError(f"option {attr.name}={value!r}: must be a whole number")
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise OptionsError(f"option {attr.name}={value}: must be {span}")

    return check


def _image_tokens(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
    """0 (the bundle's budget) or what Qwen2.5-VL's vision tower takes in llama.cpp."""
    _opt_int(0, MAX_IMAGE_TOKENS)(inst, attr, value)
    if 0 < value < MIN_IMAGE_TOKENS:
        raise OptionsError(
            f"option {attr.name}={value}: must be 0 (the bundle's budget) "
            f"or from {MIN_IMAGE_TOKENS} to {MAX_IMAGE_TOKENS}"
        )


def _opt_float(low: float, high: float | None = None) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    """A finite number in [low, high]: NaN or infinity would reach the JSON output, which cannot hold them."""

    def check(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise OptionsError(f"option {attr.name}={value!r}: must be a number")
        if not math.isfinite(value):
            raise OptionsError(f"option {attr.name}={value}: must be a finite number")
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise OptionsError(f"option {attr.name}={value}: must be {span}")

    return check


def _references(value: Any) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise OptionsError(f"option references={value!r}: must be a list of reference counts, e.g. [5, 10, 15]")
    refs = tuple(value)
    for k in refs:
        if not whole_number(k) or not 1 <= k <= MAX_REFERENCES:
            raise OptionsError(
                f"option references={list(refs)!r}: each count must be a whole number from 1 to {MAX_REFERENCES}"
            )
    return tuple(int(k) for k in refs)


def _region(value: Any) -> Region | None:
    if value is None or (isinstance(value, str) and not value):
        return None
    try:
        region = Region.parse(value)
    except Clue2GeoError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise OptionsError(
            f"option region={value!r}: not a region ({exc}); give e.g. 'FR,DE' or 'bbox:W,S,E,N'"
        ) from None
    if region.kind == "polygon":  # a Region built directly: its outline prepared here, before threads share it
        region.warm()
    return region


def _py(value: Any) -> Any:
    """numpy scalars as Python ones, so options serialise (and digest) like the numbers they are."""
    return value.item() if isinstance(value, np.generic) else value


@attrs.frozen(kw_only=True, init=False)
class Options:
    """Pipeline switches. ``use_cluemap=False`` / ``use_refinement=False`` are the paper's w/o CM / w/o CR.
    Every value is checked here (type, range, finite), so a bad one is refused by name before any
    image is read, and no NaN or infinity can reach a record."""

    use_cluemap: bool = attrs.field(default=True, validator=_opt_bool, metadata=flag(help="Off: the paper's w/o CM."))
    use_refinement: bool = attrs.field(
        default=True, validator=_opt_bool, metadata=flag(help="Off: the paper's w/o CR.")
    )
    references: tuple[int, ...] = attrs.field(
        default=(5, 10, 15),
        converter=_references,
        metadata=flag(
            help=f"Gallery points shown to the RAG prompts, one prompt per count (each 1 to {MAX_REFERENCES}).",
            metavar="N,N,...",
        ),
    )
    samples_per_prompt: int = attrs.field(
        default=1, converter=_py, validator=_opt_int(1, MAX_SAMPLES), metadata=flag(low=1)
    )
    sample_temperature: float = attrs.field(
        default=0.7,
        converter=_py,
        validator=_opt_float(0.0),
        metadata=flag(help="Temperature of the extra samples (with --samples-per-prompt above 1).", low=0.0),
    )
    nearest_neighbour_candidate: bool = attrs.field(
        default=False,
        validator=_opt_bool,
        metadata=flag(help="Add the nearest gallery coordinate as a candidate.", switch=False),
    )
    constrain: Literal["fallback", "always", "never"] = attrs.field(
        default="always", metadata=flag(choices=CONSTRAIN_CHOICES)
    )
    alpha: float = attrs.field(
        default=0.5,
        converter=_py,
        validator=_opt_float(0.0, 1.0),
        metadata=flag(
            help="Cluemap: weight of a cue's match to the image against its agreement with the other cues (eq. 4).",
            low=0.0,
            high=1.0,
        ),
    )
    max_cue_tokens: int = attrs.field(
        default=512,
        converter=_py,
        validator=_opt_int(1, MAX_GENERATION_TOKENS),
        metadata=flag(low=CLI_MIN_TOKENS),
    )
    max_answer_tokens: int = attrs.field(
        default=128,
        converter=_py,
        validator=_opt_int(1, MAX_GENERATION_TOKENS),
        metadata=flag(low=CLI_MIN_TOKENS),
    )
    image_tokens: int = attrs.field(
        default=0,
        converter=_py,
        validator=_image_tokens,
        metadata=flag(
            help=f"Vision tokens per photo, {MIN_IMAGE_TOKENS} to {MAX_IMAGE_TOKENS}, never above the bundle's budget "
            "(0: the bundle's, 1024 unless it says). Fewer make the vision tower and the prefill faster "
            "(docs/speed.md); what they cost in accuracy is not measured.",
            low=0,
            high=MAX_IMAGE_TOKENS,
        ),
    )
    region: Region | None = attrs.field(
        default=None,
        converter=_region,
        metadata=flag(
            help="Where the photo is known to be: ISO codes 'FR,DE', 'bbox:WEST,SOUTH,EAST,NORTH', "
            "'circle:LAT,LON,KM' or 'geojson:AREA.geojson' (a Polygon or MultiPolygon in WGS84 lon/lat)."
        ),
    )

    @constrain.validator
    def _constrain(self, attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in CONSTRAIN_CHOICES:
            raise OptionsError(f"option constrain={value!r}: must be one of {', '.join(CONSTRAIN_CHOICES)}")

    def __init__(self, **kwargs: Any) -> None:
        """The fields by name; an unknown one is refused with the known names (not a bare TypeError)."""
        known = {f.name for f in attrs.fields(type(self))}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise OptionsError(f"unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        self.__attrs_init__(**kwargs)  # type: ignore[attr-defined]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Options:
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["references"] = list(self.references)
        d["region"] = self.region.to_dict() if self.region else None
        return d

    def digest(self) -> str:
        """sha256 of the options as canonical JSON: records made under other options are not reused.
        An option added after records were first made is left out while at its default, so earlier
        records, validations and known answers keep their digest (``LATER_OPTIONS``)."""
        d = self.to_dict()
        for name in LATER_OPTIONS:
            if d[name] == attrs.fields_dict(Options)[name].default:
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
