"""Encoder benchmark: ONNX Runtime (the runtime's encoders) vs the PyTorch originals on the same inputs.

Prints JSON: items/s for each side on the same preprocessed tensors (image preprocessing, shared
by both, is timed on its own) and the max absolute difference of the unit embeddings.
Needs the [export] extra (torch). The demo's random towers are rebuilt from the same seed.

    python bench/encoders.py --bundle artifacts/demo [--device cpu|cuda] [--batch 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clue2geo_sdk import Bundle
from clue2geo_sdk.engines.encoders import ClipEncoder, GpsClipEncoder, SbertEncoder, preprocess, providers_for


def rate(fn: Callable[[], np.ndarray], n: int, repeats: int) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return n * repeats / (time.perf_counter() - t0), out


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("artifacts/demo"))
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from geoclip import LocationEncoder
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from exporters.clip_onnx import tiny_open_clip
    from exporters.gpsclip import ImageTower
    from exporters.sbert_onnx import minilm_dir

    dev = torch.device(args.device)
    b = Bundle.open(args.bundle, verify=False)
    prov = providers_for(args.device)
    files = {r: {k: b.file(r, k) for k in b.component(r).files} for r in ("clip", "gpsclip", "sbert")}
    clip = ClipEncoder(files["clip"], b.params("clip"), prov, batch=args.batch)
    gps = GpsClipEncoder(files["gpsclip"], b.params("gpsclip"), prov)
    sbert = SbertEncoder(files["sbert"], b.params("sbert"), prov, batch=args.batch)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)) for _ in range(args.batch)]
    texts = [f"cue {i}: a red-roofed building beside a canal with bicycles, sign number {i}" for i in range(args.batch)]
    coords = np.column_stack([rng.uniform(-90, 90, 4096), rng.uniform(-180, 180, 4096)]).astype(np.float32)
    results: dict = {
        "device": args.device,
        "batch": args.batch,
        "providers": prov,
        "torch_threads": torch.get_num_threads(),
    }

    def compare(name: str, n: int, onnx_fn, torch_fn) -> None:  # noqa: ANN001
        r_onnx, o = rate(onnx_fn, n, args.repeats)
        with torch.inference_mode():
            r_torch, t = rate(torch_fn, n, args.repeats)
        results[name] = {
            "onnx_per_s": round(r_onnx, 1),
            "torch_per_s": round(r_torch, 1),
            "max_abs_diff": float(np.max(np.abs(unit(o) - unit(t)))),
        }
        print(json.dumps({name: results[name]}), flush=True)

    pix = torch.from_numpy(preprocess(images, b.params("clip"))).to(dev)
    oc = tiny_open_clip(seed=0).to(dev).eval()
    tok = [e.ids for e in clip._tok.encode_batch(texts)]
    ids = torch.tensor(tok, device=dev)
    pix_np = pix.cpu().numpy()
    results["preprocess_images_per_s"] = round(
        rate(lambda: preprocess(images, b.params("clip")), len(images), args.repeats)[0], 1
    )
    compare(
        "clip_image",
        len(images),
        lambda: clip._image.run(None, {"pixel_values": pix_np})[0],
        lambda: oc.encode_image(pix).cpu().numpy(),
    )
    compare("clip_text", len(texts), lambda: clip.encode_texts(texts), lambda: oc.encode_text(ids).cpu().numpy())
    gpix = torch.from_numpy(preprocess(images, b.params("gpsclip"))).to(dev)
    tower = ImageTower.tiny_random(seed=0).to(dev).eval()
    gpix_np = gpix.cpu().numpy()
    compare(
        "gpsclip_image",
        len(images),
        lambda: gps._image.run(None, {"pixel_values": gpix_np})[0],
        lambda: tower(gpix).cpu().numpy(),
    )
    loc = LocationEncoder().to(dev).eval()
    tc = torch.from_numpy(coords).to(dev)
    compare("gpsclip_location", len(coords), lambda: gps.encode_locations(coords), lambda: loc(tc).cpu().numpy())
    st = SentenceTransformer(str(minilm_dir()), device=args.device)
    compare(
        "sbert",
        len(texts),
        lambda: sbert.encode(texts),
        lambda: st.encode(texts, batch_size=args.batch, normalize_embeddings=True),
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
