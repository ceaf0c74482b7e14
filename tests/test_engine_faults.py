"""The batched engine under faults, on the demo bundle's real GGUF: an exception or NaN logits in a
step, a NULL logits row, a failed decode in the middle of a multi-step prefill, a dead engine thread,
cancelled answers, and several images in flight with several samples per prompt. Each fault fails
the prompts it touched with a VLMError naming it, within a bounded wait, and the engine goes on."""

from __future__ import annotations

import ctypes
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import EXAMPLE_IMAGES

from clue2geo_sdk import Bundle
from clue2geo_sdk.engines import VLMError, make_engine
from clue2geo_sdk.engines.batched import seqs_per_image
from clue2geo_sdk.inputs.image import load_image

WAIT = 120  # seconds: a bounded wait turns a hang into a failure


class Faulty:
    """The llama_cpp module as the engine sees it, with chosen calls replaced on chosen occasions."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.decodes = 0
        self.decode_fault: Any = None  # (call number, "raise" | rc)
        self.logits_fault: Any = None  # (call number, "nan" | "null")
        self.logit_calls = 0
        self.n_vocab = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lib, name)

    def llama_decode(self, ctx: Any, batch: Any) -> int:
        self.decodes += 1
        if self.decode_fault and self.decode_fault[0] == self.decodes:
            if self.decode_fault[1] == "raise":
                raise RuntimeError(f"injected fault in step {self.decodes}")
            self._lib.llama_decode(ctx, batch)
            return int(self.decode_fault[1])
        return self._lib.llama_decode(ctx, batch)

    def llama_get_logits_ith(self, ctx: Any, i: int) -> Any:
        self.logit_calls += 1
        ptr = self._lib.llama_get_logits_ith(ctx, i)
        if self.logits_fault and self.logits_fault[0] == self.logit_calls:
            if self.logits_fault[1] == "null":
                return ctypes.POINTER(ctypes.c_float)()
            self.poisoned = np.full(self.n_vocab, np.nan, dtype=np.float32)
            return self.poisoned.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        return ptr


@pytest.fixture(scope="module")
def paths(demo_bundle: Path) -> tuple[Path, Path]:
    b = Bundle.open(demo_bundle, verify=False)
    return b.file("vlm", "model"), b.file("vlm", "mmproj")


@pytest.fixture(scope="module")
def image():
    return load_image(EXAMPLE_IMAGES / "summer_palace_beijing.jpg")


@pytest.fixture
def engine(paths):
    eng = make_engine("batched", *paths, max_images=2, ctx_per_image=2048)
    faulty = Faulty(eng._lib)
    faulty.n_vocab = eng.n_vocab
    eng._loop.lib = faulty
    yield eng, faulty
    eng.close(timeout=WAIT)


def _reference(paths, image, prompt: str, **kw: Any) -> str:
    eng = make_engine("batched", *paths, max_images=1, ctx_per_image=2048)
    try:
        with eng.open(image) as s:
            return s.ask(prompt, schema=None, timeout=WAIT, **kw).text
    finally:
        eng.close(timeout=WAIT)


def test_exception_in_a_step_fails_its_prompts_and_the_engine_goes_on(engine, paths, image) -> None:
    eng, faulty = engine
    faulty.decode_fault = (5, "raise")
    with eng.open(image) as s:
        futures = [s.submit(p, schema=None, max_tokens=12) for p in ("Where is this?", "Which country?")]
        for f in futures:
            with pytest.raises(VLMError, match="RuntimeError: injected fault in step 5"):
                f.result(timeout=WAIT)
    assert eng.stats.faults >= 1
    # still serving, and the answer is the one a fresh engine gives
    with eng.open(image) as s:
        again = s.ask("Where is this?", schema=None, max_tokens=12, timeout=WAIT)
    assert again.text == _reference(paths, image, "Where is this?", max_tokens=12)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_nan_logits_fail_the_prompt_not_the_engine(engine, image, temperature) -> None:
    eng, faulty = engine
    faulty.logits_fault = (3, "nan")
    with eng.open(image) as s:
        f = s.submit("Where is this?", schema=None, max_tokens=10, temperature=temperature)
        with pytest.raises(VLMError, match="non-finite logits"):
            f.result(timeout=WAIT)
        ok = s.ask("Which country?", schema=None, max_tokens=4, timeout=WAIT)
    assert ok.tokens == 4


def test_null_logits_fail_the_prompt(engine, image) -> None:
    eng, faulty = engine
    faulty.logits_fault = (2, "null")
    with eng.open(image) as s:
        with pytest.raises(VLMError, match="no logits"):
            s.ask("Where is this?", schema=None, max_tokens=10, timeout=WAIT)
        assert s.ask("Where is this?", schema=None, max_tokens=3, timeout=WAIT).tokens == 3


def test_failed_decode_fails_a_prompt_fed_over_several_steps(paths, image) -> None:
    """With n_batch 16 a long prompt's suffix takes several decodes; one failing in the middle must
    fail that prompt (its positions moved), not let it go on from a hole in its KV."""
    eng = make_engine("batched", *paths, max_images=1, ctx_per_image=2048, n_batch=16)
    faulty = Faulty(eng._lib)
    faulty.n_vocab = eng.n_vocab
    eng._loop.lib = faulty
    try:
        with eng.open(image) as s:
            faulty.decode_fault = (faulty.decodes + 2, 1)  # the prompt's second prefill step
            long_prompt = "Describe every object you can see in this photograph in detail. " * 3
            with pytest.raises(VLMError, match="llama_decode failed"):
                s.ask(long_prompt, schema=None, max_tokens=4, timeout=WAIT)
            assert s.ask("Where is this?", schema=None, max_tokens=3, timeout=WAIT).tokens == 3
    finally:
        eng.close(timeout=WAIT)


def test_dead_engine_thread_fails_pending_and_later_work(engine, image) -> None:
    eng, _ = engine

    def broken(waiting, live):  # the serving loop itself breaks (not a step): the thread ends
        raise SystemExit("engine thread killed")

    with eng.open(image) as s:
        eng._loop._serve = broken
        pending = s.submit("Where is this?", schema=None, max_tokens=4)
        with pytest.raises(VLMError, match="engine thread killed"):
            pending.result(timeout=WAIT)
        eng._thread.join(WAIT)
        assert not eng._thread.is_alive()
        later = s.submit("Which country?", schema=None, max_tokens=4)
        with pytest.raises(VLMError, match="stopped"):
            later.result(timeout=1)
    with pytest.raises(VLMError, match="stopped"):
        eng.open(image)


def test_cancelled_answer_does_not_stop_the_engine(engine, image) -> None:
    eng, _ = engine
    with eng.open(image) as s:
        futures = [s.submit("Describe the scene.", schema=None, max_tokens=30) for _ in range(8)]
        cancelled = [f for f in futures[2:] if f.cancel()]
        assert cancelled  # the later ones were still waiting for a sequence
        done = [f.result(timeout=WAIT) for f in futures if f not in cancelled]
    assert all(g.tokens == 30 for g in done)
    with eng.open(image) as s:
        assert s.ask("Where is this?", schema=None, max_tokens=3, timeout=WAIT).tokens == 3


def test_closing_a_session_cancels_its_prompts(engine, image) -> None:
    eng, _ = engine
    s = eng.open(image)
    futures = [s.submit("Describe the scene.", schema=None, max_tokens=200) for _ in range(3)]
    s.close()
    for f in futures:
        with pytest.raises(VLMError, match="closed before the answer"):
            f.result(timeout=WAIT)


def test_sequences_are_reserved_per_image_so_admission_waits_not_fails(paths, image) -> None:
    """Image A floods the engine with 3 samples x 5 prompts and more; image B, admitted meanwhile,
    must get its own sequences (before: "pop from empty list" once A's prompts held the pool)."""
    samples = 3
    eng = make_engine("batched", *paths, max_images=2, ctx_per_image=2048, samples_per_prompt=samples)
    try:
        assert eng.seqs_per_image == seqs_per_image(samples) == 16
        pool = len(eng._loop.free_seqs)
        assert pool == 2 * 16
        a = eng.open(image)
        flood = [
            a.submit("Describe the scene.", schema=None, max_tokens=24, seed=i, temperature=0.7) for i in range(40)
        ]
        b = eng.open(load_image(EXAMPLE_IMAGES / "summer_palace_beijing.jpg"))
        theirs = [b.submit("Where is this?", schema=None, max_tokens=6, seed=i, temperature=0.7) for i in range(16)]
        for f in flood + theirs:
            assert f.result(timeout=4 * WAIT).tokens > 0
        a.close()
        b.close()
        with eng.open(image) as s:
            s.ask("Where is this?", schema=None, max_tokens=2, timeout=WAIT)
        deadline = time.monotonic() + WAIT  # closing is asynchronous: the engine thread frees them
        while len(eng._loop.free_seqs) < pool and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(eng._loop.free_seqs) == list(range(pool))  # every sequence came back, once
    finally:
        eng.close(timeout=WAIT)


def test_threads_with_three_samples_and_several_images_in_flight(demo_bundle: Path) -> None:
    """The whole pipeline with samples_per_prompt=3 and 3 images in flight through locate_many."""
    from clue2geo_sdk import Geolocator

    photos = sorted(EXAMPLE_IMAGES.glob("*.jpg"))[:3] * 2
    with Geolocator.load(
        demo_bundle, device="cpu", max_in_flight=3, samples_per_prompt=3, max_cue_tokens=48, max_answer_tokens=40
    ) as geo:
        assert geo.vlm.seqs_per_image == 16
        results = list(geo.locate_many(photos))
    failures = [r for r in results if not hasattr(r, "lat")]
    assert not failures, failures
    for pred in results:  # every prompt answered three times (the random model's answers may not parse)
        assert {k: len(v) for k, v in pred.raw_outputs.items() if k != "cues"} == {
            "direct": 3,
            "rag5": 3,
            "rag10": 3,
            "rag15": 3,
        }


def test_result_and_close_take_timeouts(engine, image) -> None:
    eng, _ = engine
    gate, stepping = threading.Event(), threading.Event()
    real = eng._loop._step

    def slow(live):
        stepping.set()
        gate.wait(WAIT)
        return real(live)

    eng._loop._step = slow
    s = eng.open(image)
    f = s.submit("Where is this?", schema=None, max_tokens=2)
    assert stepping.wait(WAIT)  # the image prefix is evaluated first (seconds on a loaded host): wait for the step
    with pytest.raises(TimeoutError):
        f.result(timeout=0.5)
    with pytest.raises(VLMError, match="did not stop within 0.5 s"):  # the thread is stuck in a step
        eng.close(timeout=0.5)
    gate.set()
    eng.close(timeout=WAIT)  # now it stops, fails what was in flight, and frees the native contexts
    assert eng._freed and not eng._thread.is_alive()
    with pytest.raises(VLMError, match="closed"):
        f.result(timeout=WAIT)


def test_a_prompt_cancelled_while_it_is_failed_does_not_break_the_engine(engine, image) -> None:
    """The caller may cancel a waiting future at the moment the engine fails it (a closed session):
    the engine must go on, and every other prompt must still get its answer or its error."""
    eng, _ = engine
    for _ in range(5):
        s = eng.open(image)
        futures = [s.submit("Describe the scene.", schema=None, max_tokens=50) for _ in range(12)]
        s.close()
        for f in futures[::2]:
            f.cancel()
        for f in futures:
            with pytest.raises((VLMError, CancelledError)):
                f.result(timeout=WAIT)
    with eng.open(image) as s:
        assert s.ask("Where is this?", schema=None, max_tokens=3, timeout=WAIT).tokens == 3
    assert eng._thread.is_alive()
