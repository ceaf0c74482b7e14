"""Pipeline benchmark on a bundle: cold-start time of ``Geolocator.load`` and seconds per image per stage.

    python bench/pipeline.py --bundle artifacts/demo [--images examples/images] [--repeats 2] [--device cpu]

Prints JSON: load seconds (with and without sha256 verification), then per stage the mean and max
seconds over all images x repeats, and the VLM's generated tokens and tokens/s per call kind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

from clue2geo_sdk import Geolocator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("artifacts/demo"))
    ap.add_argument("--images", type=Path, default=Path("examples/images"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--max-cue-tokens", type=int, default=512)
    ap.add_argument("--max-answer-tokens", type=int, default=128)
    args = ap.parse_args()
    images = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    opts = {"max_cue_tokens": args.max_cue_tokens, "max_answer_tokens": args.max_answer_tokens}
    t0 = time.perf_counter()
    Geolocator.load(args.bundle, device=args.device, verify=True, **opts).close()
    load_verified = time.perf_counter() - t0
    t0 = time.perf_counter()
    geo = Geolocator.load(args.bundle, device=args.device, verify=False, **opts)
    load_plain = time.perf_counter() - t0
    stages: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, list[tuple[int, float, bool]]] = defaultdict(list)
    with geo:
        for _ in range(args.repeats):
            for img in images:
                pred = geo.locate(img)
                for k, v in pred.timings.items():
                    stages[k].append(v)
                for kind, gens in pred.raw_outputs.items():
                    for g in gens:
                        key = f"{'rag' if kind.startswith('rag') else kind}/{'schema' if g['constrained'] else 'free'}"
                        calls[key].append((g["tokens"], g["seconds"], g["constrained"]))
    out = {
        "bundle": str(args.bundle),
        "device": args.device,
        "images": len(images),
        "repeats": args.repeats,
        "load_s": {"verify": round(load_verified, 3), "no_verify": round(load_plain, 3)},
        "stages_s": {k: {"mean": round(statistics.mean(v), 4), "max": round(max(v), 4)} for k, v in stages.items()},
        "vlm_calls": {
            k: {
                "calls": len(v),
                "mean_tokens": round(statistics.mean(t for t, _, _ in v), 1),
                "tokens_per_s": round(sum(t for t, _, _ in v) / max(1e-9, sum(s for _, s, _ in v)), 1),
                "ms_per_token": round(1000 * sum(s for _, s, _ in v) / max(1, sum(t for t, _, _ in v)), 2),
            }
            for k, v in calls.items()
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
