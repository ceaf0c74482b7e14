"""What a bundle is made of: its roles, and per role a component (files pinned by sha256, parameters).

The lowest module of the bundle package: the parser builds these, :class:`~clue2geo_sdk.bundle.manifest.
Bundle` holds them and the writer records them, so none of those three needs another to name them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import attrs

ROLES: tuple[str, ...] = ("vlm", "clip", "gpsclip", "sbert", "gallery", "metadata")
#: Roles a bundle may carry besides its models, added after the build (``bundle attach-validation``,
#: the demo's known-answer set): hashed and signed with the bundle, but not part of what it computes,
#: so :func:`models_digest` leaves them out.
ATTACHED_ROLES: tuple[str, ...] = ("validation", "selftest")


@attrs.frozen(kw_only=True)
class ComponentFile:
    """One file of a component: where it is (relative to the bundle) and what its bytes must be."""

    path: str
    sha256: str
    bytes: int


@attrs.frozen(kw_only=True)
class Component:
    """One role of the bundle: its files, the parameters the runtime needs, and where it came from."""

    role: str
    files: Mapping[str, ComponentFile]
    params: Mapping[str, Any] = attrs.field(factory=dict)
    provenance: Mapping[str, Any] = attrs.field(factory=dict)
    random_weights: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The component as the manifest stores it."""
        return {
            "role": self.role,
            "files": {k: attrs.asdict(f) for k, f in self.files.items()},
            "params": dict(self.params),
            "provenance": dict(self.provenance),
            "random_weights": self.random_weights,
        }


def models_digest(components: Mapping[str, Component]) -> str:
    """sha256 of what computes the answers: every model component's files (sha256) and parameters as
    the manifest records them; provenance (build notes, timings) and attached roles left out. Attaching
    a validation changes the manifest digest but not this one, so a validation names the models it
    measured and stays true after it is attached. A rebuild from the same sources gets another one
    (the DuckDB metadata file is not byte-reproducible), so a validation never carries over unmeasured."""
    body = [
        {k: v for k, v in components[r].to_dict().items() if k != "provenance"}  # build notes, timings
        for r in sorted(components)
        if r not in ATTACHED_ROLES
    ]
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
