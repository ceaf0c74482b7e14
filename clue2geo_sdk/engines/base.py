"""What every VLM engine shares: the answer type, the session seam, counters and native set-up."""

from __future__ import annotations

import abc
import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import attrs

from .._native import llama_cpp_module
from ..errors import Clue2GeoError, MissingExtraError
from ..inputs.image import LoadedImage

# The system turn Qwen2.5-VL's chat template adds when none is given (llama-cpp-python's
# Qwen25VLChatHandler and the model's own template agree); training uses the same text.
SYSTEM_PROMPT = "You are a helpful assistant."


class VLMError(Clue2GeoError, RuntimeError):
    """The VLM could not answer one prompt (image encode failed, context overflow, closed engine)."""


@attrs.frozen(kw_only=True)
class Generation:
    """One model answer: the text, whether a grammar constrained it, whether it hit ``max_tokens``
    (``truncated``), tokens generated, prompt tokens after the shared image prefix, and seconds."""

    text: str
    constrained: bool
    tokens: int
    seconds: float
    truncated: bool = False
    prompt_tokens: int = 0


@attrs.define
class EngineStats:
    """Counted, not timed: what the engine did (the benchmark reads these)."""

    image_encodes: int = 0
    prefix_tokens: int = 0
    suffix_tokens: int = 0
    generated_tokens: int = 0
    decode_calls: int = 0
    faults: int = 0  # steps that raised or failed; their prompts failed, the engine went on
    grammar_checks: int = 0
    grammar_full_masks: int = 0

    def to_dict(self) -> dict[str, int]:
        return attrs.asdict(self)


class ImageSession(abc.ABC):
    """Every prompt about one image goes through its session, so an engine can share the image.
    Engines implement :meth:`submit` and :meth:`close`; the rest follows from them."""

    @abc.abstractmethod
    def submit(
        self,
        prompt: str,
        *,
        schema: Mapping[str, Any] | None,
        max_tokens: int,
        seed: int | None = None,
        temperature: float | None = None,
    ) -> Future[Generation]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def ask(self, prompt: str, *, timeout: float | None = None, **kwargs: Any) -> Generation:
        """Submit and wait; ``timeout`` seconds at most (``TimeoutError`` past it, the prompt goes on)."""
        return self.submit(prompt, **kwargs).result(timeout=timeout)

    def __enter__(self) -> ImageSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VisionLanguageModel(Protocol):
    name: str
    stats: EngineStats

    def open(self, image: LoadedImage, *, image_tokens: int = 0) -> ImageSession:
        """A session for one image, resized to ``image_tokens`` vision tokens at most (0: the
        engine's budget; a larger number cannot raise it)."""
        ...

    def close(self) -> None: ...


_SILENT_CALLBACK: Any = None
_INIT_LOCK = threading.Lock()
_BACKEND_READY = False


def silence_native_logs() -> None:
    """Route llama.cpp's and mtmd's native logs to a no-op callback (process-wide, idempotent).

    Both libraries log through callbacks, so this silences them without touching stdout/stderr
    (which other threads may be using). A verbose VLM simply doesn't call it.
    """
    global _SILENT_CALLBACK
    if _SILENT_CALLBACK is not None:
        return
    llama_cpp = llama_cpp_module()
    import llama_cpp.mtmd_cpp as mtmd  # native: only after llama_cpp_module() loaded libstdc++ (_native)

    @llama_cpp.llama_log_callback
    def _drop(level: int, text: bytes, user_data: Any) -> None:
        return None

    _SILENT_CALLBACK = _drop  # keep a reference: the C side holds only the pointer
    llama_cpp.llama_log_set(_drop, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(_drop, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(_drop, ctypes.c_void_p(0))


def load_llama_cpp(verbose: bool) -> tuple[Any, Any]:
    """llama-cpp-python's low-level bindings and mtmd, the backend initialised once per process."""
    global _BACKEND_READY
    try:
        llama_cpp = llama_cpp_module()
        import llama_cpp.mtmd_cpp as mtmd  # native: only after llama_cpp_module() loaded libstdc++ (_native)
    except ImportError as exc:  # a core dependency, so no extra brings it: name the reinstall
        raise MissingExtraError(
            "llama_cpp",
            None,
            "the VLM",
            install="pip install -c constraints.txt --force-reinstall llama-cpp-python",
        ) from exc
    if not verbose:
        silence_native_logs()
    with _INIT_LOCK:
        if not _BACKEND_READY:
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
    return llama_cpp, mtmd


# Why: llama.cpp's "extra buffer types" repack weights for special CPU kernels. On CPUs with AMX
# (Intel Sapphire Rapids and later) a native build of llama-cpp-python 0.3.36 routes matrix products
# to ggml's AMX kernels through them and segfaults at the first image prefill (ggml_backend_amx_mul_mat).
# So wherever AMX could run — the CPU reports it, or the llama.cpp build has AMX kernels — every
# model this package loads, loads with them off. Elsewhere they stay on: they carry the AVX2/AVX-512
# "repack" kernels (measured on this project's AVX-512 CI host: ~25 % faster prefill and decode).
# A CPU without AMX never shows the crash, so the tests assert the decision, not the host's luck.
_DEFAULTS_LOCK = threading.Lock()
_AMX_CPU_FLAGS = ("amx_tile", "amx_int8", "amx_bf16")


def amx_possible(system_info: str, cpu_flags: Iterable[str]) -> bool:
    """True when AMX kernels could run: llama.cpp was built with them (``AMX_INT8 = 1`` in its
    system info) or the CPU reports any AMX flag."""
    return "AMX_INT8 = 1" in system_info or "AMX_BF16 = 1" in system_info or bool(set(cpu_flags) & set(_AMX_CPU_FLAGS))


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first CPU's flags from /proc/cpuinfo, or from ``cpuinfo`` text (empty where unreadable)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                cpuinfo = fh.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


@functools.cache
def use_extra_bufts() -> bool:
    """Whether models load with llama.cpp's extra buffer types: off wherever AMX could run."""
    info = llama_cpp_module().llama_print_system_info().decode(errors="replace")
    return not amx_possible(info, cpu_flags())


def model_params(lib: Any, *, n_gpu_layers: int = 0) -> Any:
    """``llama_model_params`` for every load in this package: extra buffer types off (see above)."""
    params = lib.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_extra_bufts = use_extra_bufts()
    return params


@contextlib.contextmanager
def portable_model_defaults() -> Iterator[None]:
    """While held, llama-cpp-python's ``llama_model_default_params`` follows :func:`use_extra_bufts`.

    For loads through the high-level ``Llama`` class, which builds its own params from that function
    and offers no argument for the setting. Restored on exit; a lock keeps concurrent loads apart."""
    mod = llama_cpp_module().llama_cpp
    setting = use_extra_bufts()
    with _DEFAULTS_LOCK:
        original = mod.llama_model_default_params

        def defaults() -> Any:
            params = original()
            params.use_extra_bufts = setting
            return params

        mod.llama_model_default_params = defaults
        try:
            yield
        finally:
            mod.llama_model_default_params = original


def available_memory_bytes() -> int | None:
    """Memory a new allocation can get without swapping: Linux's MemAvailable (free + reclaimable
    page cache), else free pages from sysconf; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def load_failure(what: str, path: Path, needed: int) -> VLMError:
    """One sentence on why llama.cpp could not load ``path``: memory when it is short, else both
    possible causes (a process memory limit looks like a bad file from inside llama.cpp)."""
    avail = available_memory_bytes()
    if avail is not None and needed > avail:
        return VLMError(
            f"llama.cpp could not load the {what} {path}: it needs about {needed / 2**30:.1f} GiB and only "
            f"{avail / 2**30:.1f} GiB of memory is free; free memory, lower max_in_flight or the bundle's "
            "n_ctx, or offload layers to a GPU (n_gpu_layers)"
        )
    return VLMError(
        f"llama.cpp could not load the {what} {path}: either it is not a complete GGUF file this llama.cpp "
        f"reads, or this process may not use the ~{needed / 2**30:.1f} GiB it needs (check ulimit -v / the "
        "container's memory limit)"
    )
