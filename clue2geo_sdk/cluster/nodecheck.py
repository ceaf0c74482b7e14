"""Bundle integrity once per node and job, not once per actor or task (no Ray imported here).

Every node reads its own copy of the bundle (shared storage, or a copy at the same path), so the
driver cannot vouch for it: the driver sends the manifest's sha256 (the bundle digest every record
carries), and on each node the first actor of a job checks that its manifest has that digest, then
verifies every file's sha256 against it. It leaves a marker in the node's temporary folder keyed by
job, node, bundle folder and digest; the node's other actors, and any actor restarted after a
worker died, wait on the same lock and find the marker. Any mismatch raises, naming the node, the
file and both digests, and the job stops before an image is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..bundle.manifest import Bundle
from ..errors import BundleIntegrityError

try:  # advisory locks: POSIX only; elsewhere concurrent first actors each verify (still correct)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

MARKER_DIR = "clue2geo-verified"
STALE_SECONDS = 7 * 24 * 3600


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sweep(folder: Path) -> None:
    """Forget markers of old jobs (a week), so the folder does not grow without end."""
    cutoff = time.time() - STALE_SECONDS
    for p in folder.glob("*"):
        with contextlib.suppress(OSError):
            if p.stat().st_mtime < cutoff:
                p.unlink()


def verify_once(
    bundle_path: str | Path, digest: str, *, node: str, job: str, folder: Path | None = None
) -> tuple[Bundle, bool]:
    """The bundle at ``bundle_path``, its manifest checked against ``digest`` and, the first time on
    this node for this job, every file's sha256. Returns the bundle and whether this call verified it."""
    folder = folder or Path(tempfile.gettempdir()) / MARKER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    bundle = Bundle.open(bundle_path, verify=False)
    if bundle.digest != digest:
        raise BundleIntegrityError(
            f"node {node}: the bundle at {bundle.root} has manifest sha256 {bundle.digest}, the driver's has "
            f"{digest}; every node needs the same bundle at the same path (shared storage or an identical copy)"
        )
    key = hashlib.sha256("\0".join((job, node, str(bundle.root), digest)).encode()).hexdigest()[:32]
    marker = folder / f"{key}.ok"
    with _locked(folder / f"{key}.lock"):
        if marker.exists():
            return bundle, False
        bundle.verify()
        marker.write_text(json.dumps({"job": job, "node": node, "bundle": str(bundle.root), "digest": digest}))
        with contextlib.suppress(OSError):
            _sweep(folder)
        os.utime(marker)
    return bundle, True
