"""The ``clue2geo`` command line: the ``main`` group and its commands, one module per command group.
Flags carry the API's argument names.

Groups are registered through module aliases (``from . import bundle as _bundle``): ``from .bundle
import bundle`` would rebind the attribute ``clue2geo_sdk.cli.bundle`` from the module to the click
group, and dotted names such as ``"clue2geo_sdk.cli.bundle.plugin"`` would stop reaching the module."""

from __future__ import annotations

import click

from .._version import __version__
from . import audit as _audit
from . import bundle as _bundle
from . import doctor as _doctor
from . import evaluate as _evaluate
from . import gallery as _gallery
from . import locate as _locate
from . import metadata as _metadata
from . import results as _results
from . import validate as _validate
from .plugins import LazyPluginGroup


@click.group()
@click.version_option(__version__, prog_name="clue2geo")
def main() -> None:
    """clue2geo: offline photo geolocation (Clue2Geo method)."""


for _command in (
    _doctor.doctor_cmd,
    LazyPluginGroup(
        "train",
        "train",
        ("dataset", "run", "export"),
        "Build the fine-tuning data, train the three LoRA stages, export a bundle.",
    ),
    _bundle.bundle,
    _locate.locate,
    _results.export_records,
    _results.report_cmd,
    _evaluate.evaluate_cmd,
    _validate.validate_cmd,
    _audit.audit,
    _metadata.metadata_cmd,
    _gallery.gallery,
):
    main.add_command(_command)

if __name__ == "__main__":
    main()
