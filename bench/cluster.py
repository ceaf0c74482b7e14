"""Cluster benchmark: the single-machine batch runner against Ray Data with 1 and 2 CPU actors, on the
same images in one run, JSON out (needs the cluster extra).

    python bench/cluster.py --bundle artifacts/demo [--images 20] [--in-flight 4] [--batch-size 4]

Single machine: ``run_batch`` (what ``clue2geo locate`` runs) after ``Geolocator.load`` (bundle
verified). Ray: a local cluster with every core (started once, its start timed apart), then
``locate_on_ray`` with 1 actor and with 2 actors. Every engine runs ``--threads`` llama.cpp threads
(default 1: the same work per engine in every run, so 1 actor against one machine is Ray's cost
alone and 2 actors use the second core), with the same in-flight and options. Each job's wall time
includes what a job pays for: listing, read tasks, actor start, the bundle check and model load in
each actor, the merge. Reported per run: wall seconds, images/s, time to the first record, and the
steady rate over the records after the first two batches (2 x --batch-size). The ratios are
against the single machine's end-to-end time (load + run); the overhead Ray adds per image is
(1-actor job - single end-to-end) / images; it splits into a start-up (time to the 1-actor job's
first record, less the single machine's load and first record) and a steady part (1/steady rate,
1 actor minus single machine). ``--rounds`` repeats the three runs back to back (ratios per
round); the load average is printed, since a shared machine's other work shows in every figure.
"""

from __future__ import annotations

import os

# Ray sets OMP_NUM_THREADS for its workers (to their CPU request, at least 1); set it here too, before
# llama.cpp's OpenMP runtime loads, so the single-machine run and the actors run under the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from PIL import Image, ImageOps  # noqa: E402

from clue2geo_sdk import Geolocator  # noqa: E402
from clue2geo_sdk.inputs.discover import discover  # noqa: E402
from clue2geo_sdk.runs.batch import run_batch  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def make_images(n: int, folder: Path) -> list[Path]:
    """``n`` distinct JPEGs cut from the example photos (the same ones every run)."""
    bases = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.open(bases[i % len(bases)]).convert("RGB")
        if (i // len(bases)) % 2:
            img = ImageOps.mirror(img)
        w, h = img.size
        k = i // (2 * len(bases))
        img = img.crop((k * w // 40, k * h // 40, w - k * w // 40, h))
        path = folder / f"img{i:02d}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out


class Clock:
    """When each record arrived, from a start mark."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []

    def __call__(self, rec: dict) -> None:
        self.times.append(time.perf_counter() - self.t0)

    @property
    def first(self) -> float:
        return self.times[0] if self.times else 0.0

    def steady(self, skip: int) -> float | None:
        """Images/s over the records after the first ``skip`` (past the start and the first windows or
        batches, so a sliding window and whole batches are measured alike)."""
        if len(self.times) <= skip:
            return None
        span = self.times[-1] - self.times[skip - 1]
        return (len(self.times) - skip) / span if span > 0 else None


def single(bundle: Path, paths: list[Path], out: Path, args: argparse.Namespace, opts: dict) -> dict:
    t0 = time.perf_counter()
    geo = Geolocator.load(
        bundle, device="cpu", verify=True, max_in_flight=args.in_flight, n_threads=args.threads, **opts
    )
    load = time.perf_counter() - t0
    clock = Clock()
    with geo:
        s = run_batch(geo, list(discover(paths, recursive=False)), out, on_record=clock)
    run = time.perf_counter() - clock.t0
    n = len(paths)
    return {
        "load_s": round(load, 2),
        "run_s": round(run, 2),
        "end_to_end_s": round(load + run, 2),
        "first_record_s": round(clock.first, 2),
        "images_per_s": round(n / run, 3),
        "steady_images_per_s": round(clock.steady(2 * args.batch_size) or 0.0, 3),
        "images_per_s_end_to_end": round(n / (load + run), 3),
        "ok": s.ok,
        "error": s.error,
    }


def on_ray(bundle: Path, folder: Path, out: Path, actors: int, args: argparse.Namespace, opts: dict) -> dict:
    from clue2geo_sdk.cluster import locate_on_ray

    clock = Clock()
    s = locate_on_ray(
        [folder],
        bundle,
        out,
        actors=actors,
        in_flight=args.in_flight,
        batch_size=args.batch_size,
        device="cpu",
        n_threads=args.threads,
        on_record=clock,
        **opts,
    )
    wall = time.perf_counter() - clock.t0
    n = s.ok + s.error
    steady = clock.steady(2 * args.batch_size)
    return {
        "actors": actors,
        "plan": s.plan,
        "job_s": round(wall, 2),
        "first_record_s": round(clock.first, 2),
        "images_per_s": round(n / wall, 3),
        "steady_images_per_s": round(steady, 3) if steady else None,
        "ok": s.ok,
        "error": s.error,
        "duplicates": s.duplicates,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("artifacts/demo"))
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4, help="images per actor call")
    ap.add_argument("--max-cue-tokens", type=int, default=32)
    ap.add_argument("--max-answer-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="repeat the three runs (the machine may be shared)")
    ap.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads per engine, the same in every run (default 1)"
    )
    args = ap.parse_args()
    opts = {"max_cue_tokens": args.max_cue_tokens, "max_answer_tokens": args.max_answer_tokens}

    import ray

    report: dict = {
        "images": args.images,
        "cpus": os.cpu_count(),
        "in_flight": args.in_flight,
        "batch_size": args.batch_size,
        "llama_threads_per_engine": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "options": opts,
        "ray": ray.__version__,
        "load_average_at_start": os.getloadavg()[0],
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_images(args.images, work / "images")
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
        report["ray_init_s"] = round(time.perf_counter() - t0, 2)
        try:
            for r in range(args.rounds):  # the three runs back to back, so each round's ratios share conditions
                one = single(args.bundle, paths, work / f"single{r}.jsonl", args, opts)
                rnd: dict = {"single": one}
                for k in (1, 2):
                    rnd[f"ray_{k}_actor"] = on_ray(args.bundle, work / "images", work / f"ray{r}-{k}", k, args, opts)
                base = one["images_per_s_end_to_end"]
                rnd["ratios_vs_single_end_to_end"] = {
                    f"ray_{k}_actor": round(rnd[f"ray_{k}_actor"]["images_per_s"] / base, 3) for k in (1, 2)
                }
                r1 = rnd["ray_1_actor"]
                rnd["ray_overhead_per_image_s"] = round((r1["job_s"] - one["end_to_end_s"]) / len(paths), 3)
                rnd["ray_start_up_s"] = round(r1["first_record_s"] - one["first_record_s"] - one["load_s"], 2)
                if r1["steady_images_per_s"] and one["steady_images_per_s"]:
                    rnd["ray_steady_overhead_per_image_s"] = round(
                        1 / r1["steady_images_per_s"] - 1 / one["steady_images_per_s"], 3
                    )
                report["rounds"].append(rnd)
        finally:
            ray.shutdown()
    report["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
