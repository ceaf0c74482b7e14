"""What llama.cpp's extra buffer types cost or give on this CPU, and whether they crash it.

The runtime loads GGUFs with them off wherever AMX could run (clue2geo_sdk.engines.base.use_extra_bufts):
on AMX CPUs a native llama-cpp-python build segfaults in ggml_backend_amx_mul_mat with them on.
Elsewhere they stay on: they carry the CPU "repack" kernels, and this measures what those give. Each setting runs in its
own process (a segfault ends only that process and is reported as such):

    python bench/extra_bufts.py --bundle artifacts/demo [--runs 3] [--tokens 64]

Per setting: image prefix seconds (vision encode + prefill), prompt prefill tokens/s, decode tokens/s
(one sequence, greedy, free decoding), and the child's exit status. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LONG_PROMPT = "List every object, sign, plant, vehicle and building style visible in this photograph. " * 6


def child(bundle: Path, on: bool, tokens: int, threads: int | None) -> dict:
    from clue2geo_sdk import Bundle
    from clue2geo_sdk.engines import base, make_engine
    from clue2geo_sdk.inputs.image import load_image

    base.use_extra_bufts = lambda: on  # read at each model load
    b = Bundle.open(bundle, verify=False)
    photo = Path(__file__).resolve().parents[1] / "examples" / "images" / "summer_palace_beijing.jpg"
    eng = make_engine(
        "batched", b.file("vlm", "model"), b.file("vlm", "mmproj"), max_images=1, ctx_per_image=4096, n_threads=threads
    )
    try:
        img = load_image(photo)
        t0 = time.perf_counter()
        with eng.open(img) as s:
            s.ask("Hi.", schema=None, max_tokens=1)  # the prefix is evaluated before any prompt
            t1 = time.perf_counter()
            n_long = len(eng._tokenize(LONG_PROMPT))
            s.ask(LONG_PROMPT, schema=None, max_tokens=1)
            t2 = time.perf_counter()
            s.ask("Hi.", schema=None, max_tokens=1)
            t3 = time.perf_counter()
            g = s.ask("Describe the scene.", schema=None, max_tokens=tokens)
            t4 = time.perf_counter()
        short = t3 - t2
        return {
            "use_extra_bufts": on,
            "prefix_s": round(t1 - t0, 4),
            "prefill_tok_s": round(n_long / max(1e-9, (t2 - t1) - short), 1),
            "decode_tok_s": round((g.tokens - 1) / max(1e-9, (t4 - t3) - short), 1),
            "decoded": g.tokens,
        }
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("artifacts/demo"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.bundle, args.child == "on", args.tokens, args.threads)))
        return
    from clue2geo_sdk.cli.doctor import cpu_info, llama_info

    out: dict = {"cpu": cpu_info(), "llama_cpp": llama_info(), "settings": {}}
    for setting in ("off", "on"):
        runs, statuses = [], []
        for _ in range(args.runs):
            cmd = [sys.executable, __file__, "--bundle", str(args.bundle), "--tokens", str(args.tokens)]
            cmd += ["--child", setting] + (["--threads", str(args.threads)] if args.threads else [])
            p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            statuses.append(p.returncode)
            if p.returncode == 0:
                runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            else:
                print(f"{setting}: exit {p.returncode}: {p.stderr.strip()[-300:]}", file=sys.stderr)
        summary = {"exit_codes": statuses, "crashed": sum(c < 0 for c in statuses)}
        for key in ("prefix_s", "prefill_tok_s", "decode_tok_s"):
            if runs:
                summary[key] = statistics.median(r[key] for r in runs)
        out["settings"][setting] = summary
    off, on = out["settings"]["off"], out["settings"]["on"]
    if "decode_tok_s" in off and "decode_tok_s" in on:
        out["off_vs_on"] = {k: round(off[k] / on[k], 3) for k in ("prefill_tok_s", "decode_tok_s") if on.get(k)} | {
            "prefix_s": round(off["prefix_s"] / on["prefix_s"], 3)
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
