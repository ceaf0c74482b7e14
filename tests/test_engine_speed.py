"""The batched engine's speed levers and its clock: prompts about one image that share the head of
their suffix (the RAG prompts, several samples of one prompt) can evaluate it once (opt-in: on the
demo model the answers are the same, but the copied head's last bits may differ, which flipped one
RAG answer on the synth 3B bundle); the clock accounts for the vision tower, the prefix and every step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE_IMAGES

from clue2geo_sdk import Bundle
from clue2geo_sdk.engines import make_engine
from clue2geo_sdk.engines.ask import LOCATION_SCHEMA
from clue2geo_sdk.engines.loop_state import MIN_SHARED, AskState, ImageState, shared_head
from clue2geo_sdk.inputs.image import load_image
from clue2geo_sdk.pipeline.prompts import RAG
from clue2geo_sdk.pipeline.stages import format_references

SIMILAR = [(48.8584 + i, 2.2945 - i) for i in range(15)]
DISSIMILAR = [(-33.8568 + i, 151.2153 - i) for i in range(15)]
# the pipeline's three RAG prompts: the header and the first k similar references are shared
RAG_PROMPTS = [
    RAG.format(similar=format_references(SIMILAR[:k]), dissimilar=format_references(DISSIMILAR[:k]))
    for k in (5, 10, 15)
]


def _ask(image: ImageState, suffix: list[int]) -> AskState:
    return AskState(
        image=image,
        suffix=suffix,
        max_tokens=4,
        temperature=0.0,
        rng=np.random.default_rng(0),
        grammar=None,
        future=None,
    )


def test_shared_head_picks_the_longest_common_head_of_the_same_image() -> None:
    img, other = ImageState(rgb=b"", size=(1, 1)), ImageState(rgb=b"", size=(1, 1))
    base = list(range(100))
    a = _ask(img, base[:60] + [500, 501])
    short = _ask(img, base[:30] + [7])
    long = _ask(img, base[:50] + [8])
    elsewhere = _ask(other, base[:61])
    assert shared_head(a, [short, long, elsewhere]) == (long, 50)
    assert shared_head(a, [elsewhere]) == (None, 0)  # another image's KV is never copied
    assert shared_head(_ask(img, base[:20]), [_ask(img, base[: MIN_SHARED - 1] + [9])]) == (None, 0)
    # an identical prompt (another sample) copies all but its last token, whose logits it needs
    same = _ask(img, base[:40])
    assert shared_head(same, [_ask(img, base[:40])])[1] == 39


@pytest.fixture(scope="module")
def engine(demo_bundle: Path):
    b = Bundle.open(demo_bundle, verify=False)
    eng = make_engine("batched", b.file("vlm", "model"), b.file("vlm", "mmproj"), max_images=1, ctx_per_image=4096)
    yield eng
    eng.close()


def test_shared_prefill_is_off_by_default(engine) -> None:
    assert engine.share_prefill is False


def _answers(engine, share: bool, prompts: list[str], **kw) -> tuple[list[str], int, int]:
    engine.share_prefill = share
    shared0, evaluated0 = engine.clock.shared_tokens, engine.stats.suffix_tokens
    with engine.open(load_image(EXAMPLE_IMAGES / "summer_palace_beijing.jpg")) as s:
        futures = [s.submit(p, schema=LOCATION_SCHEMA, max_tokens=24, **kw) for p in prompts]
        texts = [f.result().text for f in futures]
    return texts, engine.clock.shared_tokens - shared0, engine.stats.suffix_tokens - evaluated0


def test_rag_prompts_share_their_head_and_answer_the_same(engine) -> None:
    alone, shared_off, evaluated_off = _answers(engine, False, RAG_PROMPTS)
    together, shared_on, evaluated_on = _answers(engine, True, RAG_PROMPTS)
    assert together == alone
    assert shared_off == 0
    suffix = sum(len(engine._tokenize(f"{p}<|im_end|>\n<|im_start|>assistant\n")) for p in RAG_PROMPTS)
    assert evaluated_off == suffix
    assert shared_on >= 2 * MIN_SHARED and evaluated_on == suffix - shared_on


def test_samples_of_one_prompt_share_all_but_the_last_token(engine) -> None:
    prompts = RAG_PROMPTS[:1] * 3
    alone, _, _ = _answers(engine, False, prompts)
    together, shared, _ = _answers(engine, True, prompts)
    assert together == alone and len(set(alone)) == 1  # greedy: the three samples agree
    n = len(engine._tokenize(f"{prompts[0]}<|im_end|>\n<|im_start|>assistant\n"))
    assert shared == 2 * (n - 1)


def test_clock_accounts_for_vision_prefix_and_steps(engine) -> None:
    engine.clock.trace = True
    before = engine.clock.to_dict()
    stats0 = engine.stats.to_dict()
    texts, _, _ = _answers(engine, True, RAG_PROMPTS[:2])
    after = engine.clock.to_dict()
    stats1 = engine.stats.to_dict()
    assert after["vision_s"] > before["vision_s"] and after["prefix_s"] > before["prefix_s"]
    assert after["prefix_tokens"] - before["prefix_tokens"] == stats1["prefix_tokens"] - stats0["prefix_tokens"]
    steps = (after["prefill_steps"] + after["decode_steps"]) - (before["prefill_steps"] + before["decode_steps"])
    assert steps == stats1["decode_calls"] - stats0["decode_calls"]
    assert after["prefill_tokens"] - before["prefill_tokens"] == stats1["suffix_tokens"] - stats0["suffix_tokens"]
    records = engine.clock.asks[-2:]
    assert [r["generated"] for r in records] and all(r["prefill_s"] > 0 and r["wall_s"] > 0 for r in records)
    assert sorted(r["label"] for r in records) == ["Suppose you are an expert in"] * 2
    engine.clock.trace = False
