"""``python -m clue2geo_sdk.cli``: the ``clue2geo`` command."""

from . import main

main()
