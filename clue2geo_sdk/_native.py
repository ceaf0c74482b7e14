"""Native-library load order.

usearch's extension links libstdc++ statically; once it is loaded first, importing onnxruntime
segfaults (seen with usearch 2.26 + onnxruntime 1.32 on Linux). Loading the system libstdc++ with
RTLD_GLOBAL before usearch is first imported avoids it. Done lazily, at first use; a program that
imports usearch itself before clue2geo should import onnxruntime first.
"""

from __future__ import annotations

import ctypes
import sys
from functools import cache
from typing import Any


@cache
def _preload_libstdcxx() -> None:
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass


def usearch_index() -> Any:
    """The ``usearch.index`` module, imported safely."""
    _preload_libstdcxx()
    import usearch.index

    return usearch.index
