"""Native-library load order.

usearch's extension links libstdc++ statically; once it is loaded first, importing onnxruntime
segfaults (seen with usearch 2.26 + onnxruntime 1.32 on Linux). And on an Ubuntu 24.04 host (Intel
Xeon with AMX, Python 3.12) every llama.cpp model load of a llama-cpp-python 0.3.36 built there
segfaulted, text or image, whatever the build flags, until the system libstdc++ was loaded first
(measured: 8 of 8 loads crashed without it, 0 of 6 with it). Loading the system libstdc++ with
RTLD_GLOBAL before either library is first imported avoids both. Done lazily, at first use; a
program that imports usearch or llama_cpp itself before clue2geo should preload libstdc++ too.

Every native library the runtime uses is first imported here, at first use: the load order stays the
one above whatever the caller touches first, and ``import clue2geo_sdk`` / ``clue2geo --help`` do not pay
for shapely, DuckDB or llama.cpp (~0.25 s for shapely and DuckDB alone) when a command needs none.
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


def llama_cpp_module() -> Any:
    """The ``llama_cpp`` package, imported safely (see above)."""
    _preload_libstdcxx()
    import llama_cpp  # native: after libstdc++ (module docstring)

    return llama_cpp


def usearch_index() -> Any:
    """The ``usearch.index`` module, imported safely."""
    _preload_libstdcxx()
    import usearch.index  # native: after libstdc++ (module docstring)

    return usearch.index


def shapely_module() -> Any:
    """The ``shapely`` package (GEOS), imported on first use (module docstring)."""
    _preload_libstdcxx()
    import shapely  # native: after libstdc++, not at import (module docstring)
    import shapely.geometry  # native: loaded with shapely

    return shapely


def duckdb_module() -> Any:
    """The ``duckdb`` package, imported on first use (module docstring)."""
    _preload_libstdcxx()
    import duckdb  # native: after libstdc++, not at import (module docstring)

    return duckdb


def onnxruntime_module() -> Any:
    """The ``onnxruntime`` package, imported on first use (module docstring: never after usearch)."""
    _preload_libstdcxx()
    import onnxruntime  # native: after libstdc++, not at import (module docstring)

    return onnxruntime


def llguidance_module() -> Any:
    """The ``llguidance`` package with its llama.cpp tokenizer bridge, imported on first use."""
    _preload_libstdcxx()
    import llguidance  # native: after libstdc++, not at import (module docstring)
    import llguidance.llamacpp  # native: loaded with llguidance

    return llguidance
