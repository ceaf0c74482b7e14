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
import json
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from clue2geo_sdk import Geolocator
from clue2geo_sdk.engines.ask import LOCATION_SCHEMA
from clue2geo_sdk.inputs.image import load_image

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
    args = ap.parse_args()
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
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
