"""Pipeline benchmark: both VLM engines on one bundle in one run, JSON out.

    python bench/pipeline.py --bundle artifacts/demo [--images 8] [--in-flight 8] [--device cpu]

For each engine ("batched", the default, and the "chat" baseline): seconds per image with one image
in flight, images per second with ``--in-flight`` images in flight (the chat engine serializes, so
its rate is the serial one and is not re-measured), and counted per image: image encodes, prefix and
prompt tokens, generated tokens, decode calls. Also ms per generated token free vs under the
location JSON schema (the same prompt, ``--token-probe`` tokens). The images are the example photos
and deterministic crops/flips of them, so every run sees the same inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from clue2geo_sdk import Geolocator
from clue2geo_sdk.engines.ask import LOCATION_SCHEMA
from clue2geo_sdk.engines.base import load_llama_cpp, model_params
from clue2geo_sdk.engines.encoders import patch_grid
from clue2geo_sdk.engines.image_tokens import image_tokens, smart_size
from clue2geo_sdk.inputs.image import load_image
from clue2geo_sdk.pipeline.prompts import CUES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def make_images(n: int, folder: Path) -> list[Path]:
    """``n`` distinct images: the example photos, then mirrored and cropped variants."""
    bases = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    out = []
    for i in range(n):
        img = Image.open(bases[i % len(bases)]).convert("RGB")
        v = i // len(bases)
        if v % 2:
            img = ImageOps.mirror(img)
        if v >= 2:
            w, h = img.size
            img = img.crop((w // 10 * (v - 1), 0, w, h - h // 10 * (v - 1)))
        path = folder / f"img{i:02d}.png"
        img.save(path)
        out.append(path)
    return out


def token_probe(geo: Geolocator, image: Path, n: int) -> dict[str, float]:
    """ms per generated token, free and under the JSON schema, one image in flight: the time of an
    n-token answer minus that of a 1-token answer (the same prompt), over the n-1 extra tokens, so
    the image encode and prefill (which the chat engine repeats per call) are left out."""
    img = load_image(image)
    prompt = "Where was this photo taken? Answer in JSON."
    out: dict[str, float] = {}
    with geo.vlm.open(img) as s:
        s.ask(prompt, schema=None, max_tokens=1)  # the batched engine encodes the image for the first ask
        for label, schema in (("free", None), ("schema", LOCATION_SCHEMA)):
            one = s.ask(prompt, schema=schema, max_tokens=1)
            many = s.ask(prompt, schema=schema, max_tokens=n)
            extra = max(1, many.tokens - one.tokens)
            out[f"{label}_ms_per_token"] = round(1000 * (many.seconds - one.seconds) / extra, 2)
            out[f"{label}_tokens"] = many.tokens
    out["schema_over_free"] = round(out["schema_ms_per_token"] / out["free_ms_per_token"], 3)
    return out


def run_engine(engine: str, args: argparse.Namespace, images: list[Path]) -> dict:
    opts = {"max_cue_tokens": args.max_cue_tokens, "max_answer_tokens": args.max_answer_tokens}
    t0 = time.perf_counter()
    geo = Geolocator.load(
        args.bundle, device=args.device, verify=False, engine=engine, max_in_flight=args.in_flight, **opts
    )
    load_s = time.perf_counter() - t0
    with geo:
        before = geo.vlm.stats.to_dict()
        per_image, stage_sums = [], {}
        for p in images:
            pred = geo.locate(p)
            per_image.append(pred.timings["total"])
            for k, v in pred.timings.items():
                stage_sums.setdefault(k, []).append(v)
        after = geo.vlm.stats.to_dict()
        counted = {k: round((after[k] - before[k]) / len(images), 1) for k in after}
        result = {
            "load_s": round(load_s, 3),
            "latency_s_per_image": round(statistics.mean(per_image), 3),
            "stages_s_mean": {k: round(statistics.mean(v), 4) for k, v in stage_sums.items()},
            "per_image_counts": counted,
        }
        if engine == "chat":
            result["images_per_s"] = round(1 / result["latency_s_per_image"], 4)
            result["images_per_s_note"] = "serial: the chat engine answers one prompt at a time"
        else:
            t0 = time.perf_counter()
            preds = list(geo.locate_many(images, in_flight=args.in_flight))
            dt = time.perf_counter() - t0
            failed = [p for p in preds if not hasattr(p, "lat")]
            result["images_per_s"] = round(len(images) / dt, 4)
            result["in_flight"] = args.in_flight
            result["failed"] = len(failed)
        result["tokens"] = token_probe(geo, images[0], args.token_probe)
    return result


def python_probe(args: argparse.Namespace, n_seqs: int, n_tokens: int) -> dict[str, Any]:
    """Python per generated token with ``n_seqs`` answers decoding together (the target: 0.2 ms at 32):
    the engine's host time in decode-only steps (batch fill, sampling, grammar, detokenizing) over
    the tokens those steps generated, greedy, sampled at a temperature, and under the JSON schema.
    The answers are spread over ``n_seqs / 5`` images (5 prompts each, the engine's reservation)."""
    n_images = -(-n_seqs // 5)
    geo = Geolocator.load(args.bundle, device=args.device, verify=False, max_in_flight=n_images, n_threads=None)
    out: dict[str, Any] = {"sequences": n_seqs, "max_tokens": n_tokens}
    with geo, tempfile.TemporaryDirectory() as tmp:
        images = [load_image(p) for p in make_images(n_images, Path(tmp))]
        modes = (("greedy", 0.0, None), ("temperature 0.7", 0.7, None), ("schema", 0.0, LOCATION_SCHEMA))
        for label, temp, schema in modes:
            clock = geo.vlm.clock
            h0, s0, t0 = clock.decode_host_s, clock.decode_steps, clock.decode_tokens
            m0 = geo.vlm.stats.grammar_full_masks
            sessions = [geo.vlm.open(img) for img in images]
            futs = [
                sessions[i % n_images].submit(
                    f"Describe this photo, part {i}.", schema=schema, max_tokens=n_tokens, seed=i, temperature=temp
                )
                for i in range(n_seqs)
            ]
            gen = sum(f.result().tokens for f in futs)
            for s in sessions:
                s.close()
            host, steps, toks = clock.decode_host_s - h0, clock.decode_steps - s0, clock.decode_tokens - t0
            masks = geo.vlm.stats.grammar_full_masks - m0
            out[label] = {
                "generated": gen,
                "decode_steps": steps,
                "tokens_per_step": round(toks / max(1, steps), 1),
                "python_ms_per_token": round(1000 * host / max(1, toks), 4),
                "full_grammar_masks": masks,  # a random model's sample is mostly rejected: the worst case
            }
            print(f"{label:>16}: {out[label]}")
    return out


# -- one photo, stage by stage, against llama.cpp's own rates (the floor) ---------------------------


def bench_photo(folder: Path, size: tuple[int, int] = (640, 480)) -> Path:
    """The bench's fixed photo: the first example, resized to 640x480 (or ``size``)."""
    base = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[0]
    path = folder / f"photo{size[0]}.png"
    Image.open(base).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path)
    return path


def vision_sweep(args: argparse.Namespace, budgets: list[int]) -> dict[str, Any]:
    """The ``image_tokens`` trade-off: for each budget, one 1280x960 photo (over every budget, so each
    one binds) through the batched engine: its image tokens, the vision tower's seconds, the prefix's
    seconds through the language model, and open-to-first-token (one short prompt's prefill included).
    Budgets above the bundle's are capped by it, as in the product."""
    threads = args.threads or None
    geo = Geolocator.load(args.bundle, device=args.device, verify=False, max_in_flight=1, n_threads=threads)
    rows = []
    with geo, tempfile.TemporaryDirectory() as tmp:
        img = load_image(bench_photo(Path(tmp), (1280, 960)))
        clock = geo.vlm.clock
        with geo.vlm.open(img, image_tokens=min(budgets)) as s:  # warm-up: buffers made, weights paged in
            s.ask("Which country is this?", schema=None, max_tokens=1)
        for b in budgets:
            v0, p0, n0, t0 = clock.vision_s, clock.prefix_s, clock.prefix_tokens, time.perf_counter()
            with geo.vlm.open(img, image_tokens=b) as s:
                s.ask("Which country is this?", schema=None, max_tokens=1)
            rows.append(
                {
                    "image_tokens_asked": b,
                    "image_tokens": image_tokens(*smart_size(1280, 960, max_tokens=min(b, geo.vlm.image_max_tokens))),
                    "prefix_tokens": clock.prefix_tokens - n0,
                    "vision_s": round(clock.vision_s - v0, 2),
                    "prefix_s": round(clock.prefix_s - p0, 2),
                    "open_to_first_token_s": round(time.perf_counter() - t0, 2),
                }
            )
            print(rows[-1])
    return {"photo": "1280x960", "n_threads": geo.vlm.n_threads, "rows": rows}


def _floor_context(lib: Any, model: Any, n_threads: int) -> Any:
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = 2048, 512, 512, 1
    cparams.n_threads = cparams.n_threads_batch = n_threads
    cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the engines
    return lib.llama_init_from_model(model, cparams)


def _decode_tokens(lib: Any, ctx: Any, batch: Any, tokens: list[int], pos: int) -> float:
    """One ``llama_decode`` of ``tokens`` (one sequence, from ``pos``): its seconds."""
    for i, tok in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos + i, 1, i == len(tokens) - 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(tokens)
    t0 = time.perf_counter()
    if lib.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed in the floor probe")
    return time.perf_counter() - t0


def floor_probe(model_path: Path, n_threads: int, n_prefill: int = 256, n_decode: int = 24) -> dict[str, float]:
    """llama.cpp's own rates on this machine, same library and threads, one sequence: a plain
    ``llama_decode`` of ``n_prefill`` tokens (prefill), then ``n_decode`` steps of one token chosen
    by llama.cpp's greedy sampler (decode), and one 4-token step (what a step of 4 sequences costs)."""
    lib, _ = load_llama_cpp(False)
    model = lib.llama_model_load_from_file(str(model_path).encode(), model_params(lib))
    ctx = _floor_context(lib, model, n_threads)
    vocab = lib.llama_model_get_vocab(model)
    text = (CUES * 4).encode()
    buf = (lib.llama_token * (len(text) + 8))()
    toks = list(buf[: lib.llama_tokenize(vocab, text, len(text), buf, len(buf), True, True)])[:n_prefill]
    batch = lib.llama_batch_init(512, 0, 1)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    try:
        _decode_tokens(lib, ctx, batch, toks[:16], 0)  # warm-up: weights paged in, buffers made
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        prefill = _decode_tokens(lib, ctx, batch, toks, 0)
        pos, t0 = len(toks), time.perf_counter()
        for _ in range(n_decode):
            tok = lib.llama_sampler_sample(chain, ctx, -1)
            _decode_tokens(lib, ctx, batch, [tok], pos)
            pos += 1
        step1 = (time.perf_counter() - t0) / n_decode
        step4 = _decode_tokens(lib, ctx, batch, toks[:4], pos)
    finally:
        lib.llama_sampler_free(chain)
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    return {
        "n_threads": n_threads,
        "prefill_tok_s": round(len(toks) / prefill, 2),
        "decode_step_s": round(step1, 4),
        "step4_s": round(step4, 4),
    }


def _row(stage: str, tokens: int | str, seconds: float, floor: float | None) -> dict[str, Any]:
    over = round(seconds / floor, 2) if floor else None
    return {
        "stage": stage,
        "tokens": tokens,
        "s": round(seconds, 2),
        "floor_s": floor and round(floor, 2),
        "x_floor": over,
    }


def _decode_floor(fl: dict[str, float], steps: int, tokens: int) -> float:
    """Decode steps at llama.cpp's own step time; the extra sequences of a step at the 4-token step's margin."""
    extra = max(0.0, (fl["step4_s"] - fl["decode_step_s"]) / 3)
    return steps * fl["decode_step_s"] + max(0, tokens - steps) * extra


def stage_rows(pred: Any, clock: dict, asks: list[dict], fl: dict[str, float], cluemap: dict) -> list[dict]:
    """The per-stage table: engine work (vision, prefix, each prompt, steps, Python) against the floor,
    then the pipeline's own stages."""
    rate = fl["prefill_tok_s"]
    rows = [
        _row("vision encode (mtmd_encode_chunk; native, is its own floor)", "-", clock["vision_s"], clock["vision_s"]),
        _row("image prefix through the LLM", clock["prefix_tokens"], clock["prefix_s"], clock["prefix_tokens"] / rate),
    ]
    for a in asks:
        rows.append(_row(f"prefill: {a['label'][:40]}", a["suffix_tokens"], a["prefill_s"], a["suffix_tokens"] / rate))
        rows.append(_row(f"decode share: {a['label'][:34]}", a["generated"], a["decode_s"], None))
    steps, toks = clock["decode_steps"], clock["decode_tokens"]
    rows += [
        _row(
            f"prefill steps ({clock['prefill_steps']})",
            clock["prefill_tokens"],
            clock["prefill_s"],
            clock["prefill_tokens"] / rate,
        ),
        _row(f"decode steps ({steps})", toks, clock["decode_s"], _decode_floor(fl, steps, toks)),
        _row("host Python around llama_decode", "-", clock["host_s"], None),
        _row("suffix tokens shared (not evaluated)", clock["shared_tokens"], 0.0, None),
    ]
    rows += [_row(f"cluemap {k}", "-", v, None) for k, v in cluemap.items()]
    rows += [_row(f"pipeline lap: {k}", "-", v, None) for k, v in pred.timings.items()]
    return rows


def cluemap_sides(geo: Geolocator, photo: Path, pred: Any) -> dict[str, float]:
    """The cluemap's image side (CLIP on the patches) and text side (CLIP + SBERT on the cues), re-run
    on the photo's own cues with the same encoders."""
    img = load_image(photo)
    texts = [c.text for c in pred.cues] or ["a cue"]
    t0 = time.perf_counter()
    geo.clip.encode_images([crop for crop, _ in patch_grid(img.image, *geo.grid)])
    t1 = time.perf_counter()
    geo.clip.encode_texts(texts)
    geo.sbert.encode(texts)
    return {"image side (CLIP, patches)": t1 - t0, "text side (CLIP + SBERT)": time.perf_counter() - t1}


def run_stages(args: argparse.Namespace, photo: Path, threads: int | None, share: bool) -> dict:
    """One photo at the bench's budgets on the batched engine: the stage table and the floor."""
    opts = {"max_cue_tokens": args.max_cue_tokens, "max_answer_tokens": args.max_answer_tokens}
    geo = Geolocator.load(args.bundle, device=args.device, verify=False, max_in_flight=1, n_threads=threads, **opts)
    with geo:
        geo.vlm.clock.trace = True
        geo.vlm.share_prefill = share
        t0 = time.perf_counter()
        pred = geo.locate(photo)
        seconds = time.perf_counter() - t0
        clock = geo.vlm.clock.to_dict()
        asks = list(geo.vlm.clock.asks)
        n_threads = geo.vlm.n_threads
        sides = cluemap_sides(geo, photo, pred)
    fl = floor_probe(Path(geo.bundle.file("vlm", "model")), n_threads)
    rows = stage_rows(pred, clock, asks, fl, sides)
    floor_total = sum(
        r["floor_s"] or 0
        for r in rows
        if r["stage"].startswith(("vision", "image prefix", "prefill steps", "decode steps"))
    )
    texts = {k: [g["text"] for g in v] for k, v in pred.raw_outputs.items()}
    digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "n_threads": n_threads,
        "share_prefill": share,
        "photo_s": round(seconds, 2),
        "floor": fl,
        "answers_sha": digest,
        "lat_lon": [pred.lat, pred.lon],
        "engine_floor_s": round(floor_total, 2),
        "clock": clock,
        "rows": rows,
    }


def print_table(label: str, res: dict) -> None:
    print(f"\n== {label}: {res['photo_s']} s per photo, {res['n_threads']} threads, answers {res['answers_sha']}")
    print(f"   floor (llama.cpp, same threads): {res['floor']}; engine work at the floor: {res['engine_floor_s']} s")
    print(f"{'stage':<64}{'tokens':>8}{'s':>10}{'floor s':>10}{'x floor':>9}")
    for r in res["rows"]:
        print(f"{r['stage']:<64}{r['tokens']!s:>8}{r['s']:>10}{r['floor_s']!s:>10}{r['x_floor']!s:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("artifacts/demo"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--engines", default="batched,chat")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    ap.add_argument("--max-cue-tokens", type=int, default=512)
    ap.add_argument("--max-answer-tokens", type=int, default=128)
    ap.add_argument("--token-probe", type=int, default=256)
    ap.add_argument(
        "--stages",
        default="",
        help="instead of the engine comparison: one 640x480 photo, stage by stage against the floor, for each "
        "THREADS:SHARE configuration given (e.g. '1:off,2:on'; THREADS 0 = the engine's default; SHARE: "
        "prefill shared across an image's prompts)",
    )
    ap.add_argument(
        "--python-probe",
        type=int,
        default=0,
        metavar="SEQS",
        help="instead: Python per generated token with SEQS answers decoding together (greedy, sampled, schema)",
    )
    ap.add_argument(
        "--image-tokens",
        default="",
        metavar="N,N,...",
        help="instead: the vision tower and prefix at each image-token budget, on a 1280x960 photo",
    )
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads for --image-tokens (0: the default)")
    ap.add_argument("--json", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if args.image_tokens:
        sweep = vision_sweep(args, [int(x) for x in args.image_tokens.split(",")])
        _write({"bundle": str(args.bundle), "image_tokens": sweep}, args.json)
        return
    if args.python_probe:
        probe = python_probe(args, args.python_probe, args.token_probe)
        _write({"bundle": str(args.bundle), "probe": probe}, args.json)
        return
    if args.stages:
        with tempfile.TemporaryDirectory() as tmp:
            photo = bench_photo(Path(tmp))
            out = {"bundle": str(args.bundle), "budgets": [args.max_cue_tokens, args.max_answer_tokens], "runs": {}}
            for conf in args.stages.split(","):
                threads, share = conf.split(":")
                load = os.getloadavg()[0]
                res = run_stages(args, photo, int(threads) or None, share == "on")
                res["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before, after: others' work
                out["runs"][conf] = res
                print_table(conf, res)
        _write(out, args.json)
        return
    with tempfile.TemporaryDirectory() as tmp:
        images = make_images(args.images, Path(tmp))
        results = {e: run_engine(e, args, images) for e in args.engines.split(",")}
    out = {"bundle": str(args.bundle), "device": args.device, "images": len(images), "engines": results}
    if {"batched", "chat"} <= results.keys():
        b, c = results["batched"], results["chat"]
        out["ratios"] = {
            "latency_chat_over_batched": round(c["latency_s_per_image"] / b["latency_s_per_image"], 2),
            "throughput_batched_over_serial_chat": round(b["images_per_s"] / c["images_per_s"], 2),
            "image_encodes_per_image": {
                "batched": b["per_image_counts"]["image_encodes"],
                "chat": c["per_image_counts"]["image_encodes"],
            },
            "schema_over_free_ms_per_token": {
                "batched": b["tokens"]["schema_over_free"],
                "chat": c["tokens"]["schema_over_free"],
            },
        }
    _write(out, args.json)


def _write(out: dict, path: Path | None) -> None:
    text = json.dumps(out, indent=2)
    print(text)
    if path:
        path.write_text(text)


if __name__ == "__main__":
    main()
