"""The batched llama.cpp engine against the chat-handler baseline, on the demo bundle's real GGUF:
parity of greedy tokens, batching that changes no answer, one prefix per image, failures that stay
with their prompt or image, and the check-first grammar."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from conftest import EXAMPLE_IMAGES, FAST
from PIL import Image

from clue2geo_sdk import Bundle, Geolocator
from clue2geo_sdk.engines import VLMError, make_engine
from clue2geo_sdk.engines.ask import LOCATION_SCHEMA
from clue2geo_sdk.engines.image_tokens import image_tokens, smart_size
from clue2geo_sdk.inputs.image import load_image
from clue2geo_sdk.pipeline.parsing import parse_location

PROMPTS = ["Where was this photo taken?", "Name the country.", "Describe the scene.", "Which city is this?"]


@pytest.fixture(scope="module")
def engines(demo_bundle: Path):
    b = Bundle.open(demo_bundle, verify=False)
    made = {
        name: make_engine(name, b.file("vlm", "model"), b.file("vlm", "mmproj"), max_images=2, ctx_per_image=4096)
        for name in ("batched", "chat")
    }
    yield made
    for e in made.values():
        e.close()


@pytest.fixture(scope="module")
def image():
    return load_image(EXAMPLE_IMAGES / "summer_palace_beijing.jpg")


def test_greedy_tokens_identical_to_chat_handler(engines, image) -> None:
    """Free decoding: same template, same image tokens, same greedy tokens. (Under a schema the two
    engines use different grammar implementations — llama.cpp GBNF vs llguidance with the training
    data's JSON layout — so constrained answers are compared for validity, not token by token.)"""
    got = {}
    for name, eng in engines.items():
        with eng.open(image) as s:
            got[name] = s.ask(PROMPTS[0], schema=None, max_tokens=40)
    assert got["batched"].text == got["chat"].text
    assert got["batched"].tokens == got["chat"].tokens == 40


def test_constrained_answer_is_schema_valid_json(engines, image) -> None:
    with engines["batched"].open(image) as s:
        g = s.ask(PROMPTS[0], schema=LOCATION_SCHEMA, max_tokens=120)
    assert not g.truncated and g.constrained
    obj = json.loads(g.text)
    assert set(obj) == {"country", "city", "landmark", "lat", "lon"}
    assert g.text.startswith('{"country": ')  # json.dumps layout, as in the training data
    answer = parse_location(g.text)
    assert answer.valid and -90 <= answer.lat <= 90 and -180 <= answer.lon <= 180


def test_one_encode_and_one_prefix_for_all_prompts_of_an_image(engines, image) -> None:
    eng = engines["batched"]
    before = eng.stats.to_dict()
    with eng.open(image) as s:
        futures = [s.submit(p, schema=None, max_tokens=8) for p in PROMPTS]
        [f.result() for f in futures]
    after = eng.stats.to_dict()
    assert after["image_encodes"] - before["image_encodes"] == 1
    # the prefix (system + image) was evaluated once; each prompt prefilled only its own suffix
    suffix = sum(len(eng._tokenize(f"{p}<|im_end|>\n<|im_start|>assistant\n")) for p in PROMPTS)
    assert after["suffix_tokens"] - before["suffix_tokens"] == suffix
    assert 300 < after["prefix_tokens"] - before["prefix_tokens"] < 1100  # 345 image tokens + system turn


def test_image_tokens_lower_the_budget_for_both_engines_alike(engines, image) -> None:
    """A photo at 64 vision tokens: ~64 prefix image tokens in the batched engine (not the ~345 of the
    bundle's budget), the same greedy answer from the chat engine given the same budget, and a
    number above the engine's budget does not raise it."""
    eng = engines["batched"]
    sizes = {}
    for asked in (64, 100_000):
        before = eng.stats.prefix_tokens
        with eng.open(image, image_tokens=asked) as s:
            s.ask(PROMPTS[1], schema=None, max_tokens=1)
        sizes[asked] = eng.stats.prefix_tokens - before
    full = eng.stats.prefix_tokens
    with eng.open(image) as s:
        s.ask(PROMPTS[1], schema=None, max_tokens=1)
    full = eng.stats.prefix_tokens - full
    assert sizes[100_000] == full  # the engine's own budget: not raised
    turn = full - image_tokens(*smart_size(*image.image.size))  # the system turn's text tokens
    assert sizes[64] - turn == image_tokens(*smart_size(*image.image.size, max_tokens=64)) <= 64
    got = {}
    for name, e in engines.items():
        with e.open(image, image_tokens=64) as s:
            got[name] = s.ask(PROMPTS[0], schema=None, max_tokens=24).text
    assert got["batched"] == got["chat"]


def test_batching_changes_no_parsed_answer(engines, image) -> None:
    """The same prompts one at a time, all together, and beside another image's prompts."""
    eng = engines["batched"]
    other = load_image(EXAMPLE_IMAGES / "kauai.png")

    def ask_all(together: bool, beside: bool) -> list[str]:
        with eng.open(image) as s:
            o = eng.open(other) if beside else None
            noise = [o.submit(p, schema=LOCATION_SCHEMA, max_tokens=48) for p in PROMPTS] if o else []
            if together:
                futs = [s.submit(p, schema=LOCATION_SCHEMA, max_tokens=48) for p in PROMPTS]
                out = [f.result().text for f in futs]
            else:
                out = [s.ask(p, schema=LOCATION_SCHEMA, max_tokens=48) for p in PROMPTS]
                out = [g.text for g in out]
            [f.result() for f in noise]
            if o:
                o.close()
        return out

    alone = ask_all(False, False)
    assert ask_all(True, False) == alone
    assert ask_all(True, True) == alone
    assert all(parse_location(t) is not None for t in alone)


def test_check_first_grammar_is_valid_and_rarely_masks(engines, image) -> None:
    eng = engines["batched"]
    before = eng.stats.to_dict()
    with eng.open(image) as s:
        g = s.ask(PROMPTS[0], schema=LOCATION_SCHEMA, max_tokens=200)
    after = eng.stats.to_dict()
    checks = after["grammar_checks"] - before["grammar_checks"]
    masks = after["grammar_full_masks"] - before["grammar_full_masks"]
    assert checks == g.tokens + (0 if g.truncated else 1)  # every token checked, the end too
    assert masks < checks  # the full-vocabulary pass only on rejection
    if not g.truncated:
        obj = json.loads(g.text)
        assert set(obj) == {"country", "city", "landmark", "lat", "lon"}


def test_overflowing_prompt_fails_alone(engines, image) -> None:
    eng = engines["batched"]
    with eng.open(image) as s:
        too_long = s.submit(PROMPTS[0], schema=None, max_tokens=eng.ctx_per_image)
        fine = s.submit(PROMPTS[1], schema=None, max_tokens=4)
        with pytest.raises(VLMError, match="ctx_per_image"):
            too_long.result()
        assert fine.result().tokens == 4


def test_image_over_the_slot_fails_only_that_image(demo_bundle: Path, image) -> None:
    b = Bundle.open(demo_bundle, verify=False)
    eng = make_engine("batched", b.file("vlm", "model"), b.file("vlm", "mmproj"), max_images=2, ctx_per_image=200)
    try:
        small = load_image(Image.new("RGB", (56, 56), (40, 120, 200)))
        with eng.open(image) as big, eng.open(small) as ok:
            bad = big.submit(PROMPTS[0], schema=None, max_tokens=4)
            good = ok.submit(PROMPTS[0], schema=None, max_tokens=4)
            with pytest.raises(VLMError, match="image prefix needs"):
                bad.result()
            assert good.result().tokens == 4
    finally:
        eng.close()


def test_threads_share_one_geolocator_and_match_serial(demo_bundle: Path) -> None:
    photos = sorted(EXAMPLE_IMAGES.glob("*.jp*g")) + sorted(EXAMPLE_IMAGES.glob("*.png"))
    with Geolocator.load(demo_bundle, device="cpu", verify=False, max_in_flight=4, **FAST) as geo:
        serial = [geo.locate(p).to_dict() for p in photos]
        results: dict[int, list] = {}

        def work(i: int) -> None:
            results[i] = [geo.locate(p).to_dict() for p in photos]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        many = list(geo.locate_many(photos, in_flight=3))
    strip = ("timings", "raw_outputs")  # seconds differ; texts are compared through the answers

    def same(a: dict) -> dict:
        return {k: v for k, v in a.items() if k not in strip}

    for i in range(4):
        assert [same(r) for r in results[i]] == [same(r) for r in serial]
    assert [same(m.to_dict()) for m in many] == [same(r) for r in serial]


def test_close_waits_for_running_calls(demo_bundle: Path, photo: Path) -> None:
    geo = Geolocator.load(demo_bundle, device="cpu", verify=False, **FAST)
    out: list = []
    t = threading.Thread(target=lambda: out.append(geo.locate(photo)))
    t.start()
    while geo._running == 0 and t.is_alive():
        pass
    geo.close()  # must not pull the model from under the running call
    t.join()
    assert len(out) == 1 and out[0].lat is not None
    with pytest.raises(Exception, match="closed"):
        geo.locate(photo)


def test_load_failure_says_why_in_one_sentence(demo_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from clue2geo_sdk.engines import base

    b = Bundle.open(demo_bundle, verify=False)
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(VLMError, match="could not load the model .*complete GGUF file .* or this process may not use"):
        make_engine("batched", broken, b.file("vlm", "mmproj"))
    monkeypatch.setattr(base, "available_memory_bytes", lambda: 10)
    with pytest.raises(VLMError, match=r"needs about .* GiB and only 0.0 GiB of memory is free"):
        make_engine("batched", broken, b.file("vlm", "mmproj"))


def test_geolocator_refuses_a_cpu_load_that_cannot_fit(demo_bundle: Path, monkeypatch) -> None:
    from clue2geo_sdk.engines import base

    monkeypatch.setattr(base, "available_memory_bytes", lambda: 2**20)
    with pytest.raises(Exception, match=r"not enough memory to load bundle 'demo': its models need about .* GiB"):
        Geolocator.load(demo_bundle, device="cpu", verify=False)
