"""Does a prompt's answer depend on what shares its ``llama_decode``? Four prompts about one image,
asked alone, submitted together (prefilled in one batch) and staggered (each prefilled alone, decoded
beside the others), with llama.cpp's extra buffer types (the CPU repack kernels) on and off, each
setting in its own process. A tiny image budget keeps it short at real shapes.

    python bench/batch_determinism.py --bundle SYNTH_BUNDLE [--tokens 32] [--image-tokens 16]

Prints, per setting, which answers equal the answer asked alone (JSON).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["Describe the scene.", "Name the country.", "Which city is this?", "What is the weather like today?"]
PHOTO = Path(__file__).resolve().parents[1] / "examples" / "images" / "summer_palace_beijing.jpg"


def child(bundle: Path, bufts: bool, tokens: int, image_tokens: int) -> dict:
    from clue2geo_sdk import Bundle
    from clue2geo_sdk.engines import base, make_engine
    from clue2geo_sdk.inputs.image import load_image

    base.use_extra_bufts = lambda: bufts  # read by model_params at load
    b = Bundle.open(bundle, verify=False)
    eng = make_engine("batched", b.file("vlm", "model"), b.file("vlm", "mmproj"), max_images=1, ctx_per_image=1024)
    img = load_image(PHOTO)
    out: dict[str, list[str]] = {}
    try:
        with eng.open(img, image_tokens=image_tokens) as s:
            out["alone"] = [s.ask(p, schema=None, max_tokens=tokens).text for p in PROMPTS]
        with eng.open(img, image_tokens=image_tokens) as s:
            out["together"] = [f.result().text for f in [s.submit(p, schema=None, max_tokens=tokens) for p in PROMPTS]]
        with eng.open(img, image_tokens=image_tokens) as s:
            futures = []
            for p in PROMPTS:
                futures.append(s.submit(p, schema=None, max_tokens=tokens))
                time.sleep(0.5)  # the earlier ones are decoding when this one is prefilled
            out["staggered"] = [f.result().text for f in futures]
    finally:
        eng.close()
    same = {k: [a == b for a, b in zip(out["alone"], v, strict=True)] for k, v in out.items() if k != "alone"}
    return {"extra_bufts": bufts, "n_threads": eng.n_threads, "same_as_alone": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--image-tokens", type=int, default=16)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.bundle, args.child == "on", args.tokens, args.image_tokens)))
        return
    results = []
    for setting in ("on", "off"):
        cmd = [sys.executable, __file__, "--bundle", str(args.bundle), "--tokens", str(args.tokens)]
        cmd += ["--image-tokens", str(args.image_tokens), "--child", setting]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        last = proc.stdout.strip().splitlines()[-1:] or [""]
        results.append(json.loads(last[0]) if proc.returncode == 0 else {"extra_bufts": setting, "rc": proc.returncode})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
