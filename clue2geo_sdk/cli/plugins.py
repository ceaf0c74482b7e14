"""Commands that need the heavy export/train stacks: found by entry point when one is run, so the
runtime never imports them (DESIGN §1)."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import click

from ..errors import MissingExtraError, install_hint
from .common import fail

PLUGIN_GROUP = "clue2geo.plugins"


def plugin(name: str) -> Any:
    """The object the ``clue2geo.plugins`` entry point ``name`` names; a missing extra is named."""
    extra = "train" if name == "train" else "export"
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except ImportError as exc:
                raise MissingExtraError(exc.name or "torch", extra, f"'clue2geo {name}'") from exc
    raise click.ClickException(f"no plugin {name!r} is installed; reinstall clue2geo: {install_hint(extra)}")


class LazyPluginGroup(click.Group):
    """A command group whose commands live in a plugin and are imported only when one is run."""

    def __init__(self, name: str, plugin: str, commands: tuple[str, ...], help: str) -> None:
        super().__init__(name=name, help=help)
        self._plugin_name, self._names = plugin, commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self._names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self._names:
            return None
        try:
            return plugin(self._plugin_name).get_command(ctx, cmd_name)
        except MissingExtraError as exc:
            fail(exc)
