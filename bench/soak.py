"""Soak benchmark: thousands of generated photos through ``clue2geo locate`` with faults injected, JSON out.

    python bench/soak.py --bundle artifacts/demo [--images 2000] [--in-flight 8] [--kills 3] [--keep]

The CLI is driven as a black box (``clue2geo locate ...`` in a subprocess), so this measures whatever
the installed product does. Steps, all in a work folder deleted at the end unless ``--keep``:

1. Generate ``--images`` photos (seeded, so every run sees the same bytes): long side 32 px to 12 MP,
   JPEG/PNG/WebP/TIFF/BMP/GIF (and HEIC when pillow-heif is installed), many colour modes, some with
   EXIF GPS (a few with out-of-range or 0/0 values, as cameras without a fix write), some rotated by
   EXIF, in sub-folders with spaces and non-ASCII names; 1 in 50 corrupt (truncated, zero bytes,
   random bytes, header only, text, a header claiming 2.5 gigapixels).
2. ``locate DIR --recursive --in-flight 8`` into one journal, SIGKILLed ``--kills`` times at random
   moments (during model load or after a random number of records), each time resumed with
   ``--resume``. While the first run writes, a second writer is started on the same ``--out`` (it
   should be refused). Then a bundle file is made unreadable mid-run (``chmod 000``; as root, which
   ignores permissions, the file is replaced by a truncated copy), the run observed, restarted on the
   damaged bundle, the file restored, and the last run goes to completion (RSS sampled every second),
   then ``--resume --retry-failed``.
3. Full disk: a small tmpfs (needs root and mount rights; otherwise skipped, saying why) almost filled,
   a run whose ``--out`` lies there, then space freed and ``--resume``.
4. Checks: exactly one latest record per input, corrupt inputs recorded as errors (never missing),
   duplicates in the raw journal and the latest view, sha256 of each record against the file,
   ``clue2geo audit verify`` and ``clue2geo export --to .csv`` (one row per input), hangs (a run with
   no journal progress for ``--watchdog`` seconds is killed and counted), tracebacks on stderr, RSS of
   the last run (the last quarter within 10 % of the second), images/s per run and overall.

Prints one JSON summary on stdout (progress on stderr); exit 0 when every check passed, 1 otherwise
(``findings`` lists what failed).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageDraw, TiffImagePlugin

try:  # optional, as in the product
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF = True
except ImportError:
    HEIF = False

try:
    import psutil
except ImportError:  # /proc fallback below
    psutil = None

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[soak {time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Inputs


SUBFOLDERS = ("", "", "", "a", "b/c", "deep/1/2/3", "with space", "café ü")
FORMATS = (  # (PIL format, suffix, weight)
    ("JPEG", ".jpg", 30),
    ("JPEG", ".JPEG", 3),
    ("PNG", ".png", 18),
    ("WEBP", ".webp", 14),
    ("TIFF", ".tif", 9),
    ("BMP", ".bmp", 6),
    ("GIF", ".gif", 10),
    ("HEIF", ".heic", 10),
)
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 2 / 3, 1.0, 4 / 3, 6.0, 1 / 5)
CORRUPT_KINDS = ("truncated", "zero_bytes", "random_bytes", "header_only", "text", "bomb_header")


def _long_side(rng: random.Random) -> int:
    """Mostly phone/web sizes; a few tiny thumbnails and a few full 12 MP camera frames."""
    r = rng.random()
    if r < 0.15:
        return rng.randint(32, 128)
    if r < 0.60:
        return rng.randint(129, 800)
    if r < 0.90:
        return rng.randint(801, 1600)
    if r < 0.995:
        return rng.randint(1601, 2600)
    return 4032


def _pixels(rng: random.Random, w: int, h: int) -> Image.Image:
    """A gradient with random shapes (distinct bytes per image, compresses like a photo would not, but
    keeps thousands of multi-megapixel files small); small images also get noise."""
    c = np.array([[rng.randrange(256) for _ in range(3)] for _ in range(3)], dtype=np.float32)
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    arr = c[0] + (c[1] - c[0]) * x + (c[2] - c[0]) * y * 0.7
    if w * h <= 300_000:
        arr = arr + np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (h, w, 1)).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 12)):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        x1, y1 = x0 + rng.randint(1, max(2, w // 2)), y0 + rng.randint(1, max(2, h // 2))
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice(("rect", "ellipse", "line"))
        if shape == "rect":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.randint(1, 8))
    return img


def _dms(value: float) -> tuple[TiffImagePlugin.IFDRational, ...]:
    deg = int(value)
    minutes = int((value - deg) * 60)
    sec = round(((value - deg) * 60 - minutes) * 60 * 100)
    return (
        TiffImagePlugin.IFDRational(deg, 1),
        TiffImagePlugin.IFDRational(minutes, 1),
        TiffImagePlugin.IFDRational(sec, 100),
    )


def _exif(rng: random.Random, gps: str | None, orientation: int | None) -> tuple[Image.Exif, dict[str, Any]]:
    """EXIF with a GPS position ("ok"), an out-of-range one ("out_of_range": latitude 95) or the 0/0
    rationals a camera without a fix writes ("zero_denominator"); optionally an orientation."""
    exif = Image.Exif()
    info: dict[str, Any] = {}
    exif[ExifTags.Base.Make] = "SoakCam"
    exif[ExifTags.Base.Model] = f"S{rng.randint(1, 9)}"
    if orientation:
        exif[ExifTags.Base.Orientation] = orientation
        info["orientation"] = orientation
    if gps:
        g = exif.get_ifd(ExifTags.IFD.GPSInfo)
        if gps == "ok":
            lat, lon = rng.uniform(-60, 70), rng.uniform(-180, 180)
            info["gps"] = [round(lat, 6), round(lon, 6)]
        elif gps == "out_of_range":
            lat, lon = 95.0, rng.uniform(-180, 180)
            info["gps"] = "out_of_range"
        else:
            lat = lon = 0.0
            info["gps"] = "zero_denominator"
        g[ExifTags.GPS.GPSLatitudeRef] = "N" if lat >= 0 else "S"
        g[ExifTags.GPS.GPSLongitudeRef] = "E" if lon >= 0 else "W"
        if gps == "zero_denominator":
            zero = TiffImagePlugin.IFDRational(0, 0)
            g[ExifTags.GPS.GPSLatitude] = (zero, zero, zero)
            g[ExifTags.GPS.GPSLongitude] = (zero, zero, zero)
            g[ExifTags.GPS.GPSAltitude] = zero
        else:
            g[ExifTags.GPS.GPSLatitude] = _dms(abs(lat))
            g[ExifTags.GPS.GPSLongitude] = _dms(abs(lon))
    return exif, info


def _encode(img: Image.Image, fmt: str, rng: random.Random, exif: Image.Exif | None) -> tuple[bytes, str]:
    """Encode in ``fmt`` with a colour mode that format takes; returns the bytes and the mode used."""
    modes = {
        "JPEG": ("RGB", "RGB", "RGB", "L", "CMYK"),
        "PNG": ("RGB", "RGBA", "L", "P", "I;16"),
        "WEBP": ("RGB", "RGB", "RGBA"),
        "TIFF": ("RGB", "RGBA", "L"),
        "BMP": ("RGB", "L", "P"),
        "GIF": ("P",),
        "HEIF": ("RGB",),
    }[fmt]
    mode = rng.choice(modes)
    if mode == "P":
        im = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=rng.choice((16, 64, 256)))
    elif mode == "I;16":
        im = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    else:
        im = img.convert(mode)
    kw: dict[str, Any] = {}
    if exif is not None and fmt in ("JPEG", "PNG", "WEBP", "TIFF", "HEIF"):
        kw["exif"] = exif.tobytes()
    if fmt == "JPEG":
        kw.update(quality=rng.choice((60, 85, 95)), progressive=rng.random() < 0.2)
    elif fmt == "WEBP":
        kw.update(quality=rng.choice((50, 80)), lossless=rng.random() < 0.1 and img.width * img.height < 500_000)
    elif fmt == "TIFF" and exif is None:  # libtiff (any compression) cannot write a GPS IFD: those stay raw
        kw["compression"] = "tiff_deflate" if img.width * img.height > 200_000 else rng.choice(("raw", "tiff_lzw"))
    elif fmt == "GIF" and rng.random() < 0.2:  # an animation: the first frame is used
        second = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P", palette=Image.Palette.ADAPTIVE)
        kw.update(save_all=True, append_images=[second], duration=200, loop=0)
    elif fmt == "HEIF":
        kw["quality"] = 70
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue(), mode


def _corrupt(kind: str, rng: random.Random) -> tuple[bytes, str]:
    """Bytes of a corrupt input and the suffix it is given."""
    if kind == "zero_bytes":
        return b"", rng.choice((".jpg", ".png"))
    if kind == "random_bytes":
        return rng.randbytes(rng.randint(100, 50_000)), ".jpg"
    if kind == "text":
        return b"this is not an image, only a text file with an image suffix\n" * 20, ".png"
    if kind == "bomb_header":  # a PNG header claiming 50000 x 50000 pixels, then nothing
        ihdr = (50_000).to_bytes(4, "big") * 2 + bytes((8, 2, 0, 0, 0))
        import zlib

        crc = zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
        return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + crc, ".png"
    fmt, suffix = rng.choice((("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp")))
    w = rng.randint(200, 900)
    img = _pixels(rng, w, int(w * 0.75))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = buf.getvalue()
    if kind == "header_only":
        return data[:100], suffix
    return data[: int(len(data) * rng.uniform(0.3, 0.7))], suffix  # truncated


def generate(folder: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """Write ``n`` inputs under ``folder``; returns one manifest entry per file (path, sha256, kind)."""
    rng = random.Random(seed)
    fmts = [(f, s, w) for f, s, w in FORMATS if f != "HEIF" or HEIF]
    choices, weights = [(f, s) for f, s, _ in fmts], [w for _, _, w in fmts]
    out = []
    seen: set[str] = set()
    t = time.monotonic()
    for i in range(n):
        sub = rng.choice(SUBFOLDERS)
        entry: dict[str, Any] = {}
        if i % 50 == 25:  # 1 in 50 corrupt
            kind = CORRUPT_KINDS[(i // 50) % len(CORRUPT_KINDS)]
            data, suffix = _corrupt(kind, rng)
            entry.update(corrupt=kind, format=None)
        else:
            fmt, suffix = rng.choices(choices, weights)[0]
            long = _long_side(rng)
            aspect = rng.choice(ASPECTS)
            w, h = (long, max(32, round(long / aspect))) if aspect >= 1 else (max(32, round(long * aspect)), long)
            gps = rng.choices((None, "ok", "out_of_range", "zero_denominator"), (70, 26, 2, 2))[0]
            orientation = rng.choice((3, 6, 8)) if fmt == "JPEG" and rng.random() < 0.1 else None
            raw = fmt in ("BMP", "GIF") or (fmt == "TIFF" and gps)  # uncompressed or slow to quantise
            while raw and w * h > 1_500_000:
                w, h = w // 2, h // 2
            img = _pixels(rng, w, h)
            exif, info = _exif(rng, gps, orientation) if (gps or orientation) else (None, {})
            data, mode = _encode(img, fmt, rng, exif)
            entry.update(corrupt=None, format=fmt, size=[w, h], mode=mode, **info)
        name = f"img{i:05d}" + (" ü" if i % 97 == 3 else "") + suffix
        path = (folder / sub / name).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        entry.update(path=str(path), bytes=len(data), sha256=sha, duplicate_bytes=sha in seen)
        seen.add(sha)
        out.append(entry)
        if (i + 1) % 200 == 0:
            log(f"generated {i + 1}/{n} inputs ({(i + 1) / (time.monotonic() - t):.0f}/s)")
    return out


# --------------------------------------------------------------------------------------------------
# Running locate and watching it


class LineCounter:
    """Complete lines in a growing file, read incrementally (recounted when the file shrinks: a resume
    cutting a torn line)."""

    def __init__(self, path: Path) -> None:
        self.path, self.size, self.lines = path, 0, 0

    def count(self) -> int:
        try:
            size = self.path.stat().st_size
        except OSError:
            self.size = self.lines = 0
            return 0
        if size < self.size:
            self.size = self.lines = 0
        if size > self.size:
            with open(self.path, "rb") as fh:
                fh.seek(self.size)
                data = fh.read(size - self.size)
            self.lines += data.count(b"\n")
            self.size += len(data)
        return self.lines


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and its children (psutil, else /proc)."""
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            total = p.memory_info().rss
            for c in p.children(recursive=True):
                try:
                    total += c.memory_info().rss
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Segment:
    """One ``clue2geo`` process: its journal progress, RSS samples and how it ended."""

    def __init__(self, soak: Soak, name: str, argv: list[str], journal: Path | None) -> None:
        self.soak, self.name, self.argv = soak, name, argv
        self.counter = LineCounter(journal) if journal is not None else None
        self.base = self.counter.count() if self.counter else 0
        logs = soak.work / "logs"
        logs.mkdir(exist_ok=True)
        self.out_path, self.err_path = logs / f"{name}.out", logs / f"{name}.err"
        self.t_start = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, env=soak.env
            )
        soak.live.add(self.proc)
        self.records = 0
        self.t_first: float | None = None
        self.t_last_progress = self.t_start
        self.t_last_record: float | None = None
        self.rss: list[tuple[float, int]] = []
        self.t_rss = 0.0
        self.ended_by: str | None = None  # "sigkill" (a planned kill), "watchdog" (a hang), None (exited)
        self.rc: int | None = None
        self.t_end: float | None = None

    def poll(self) -> bool:
        """Update progress and RSS; True while the process runs."""
        now = time.monotonic()
        if self.counter is not None:
            n = max(0, self.counter.count() - self.base)
            if n > self.records:
                self.records, self.t_last_progress, self.t_last_record = n, now, now
                if self.t_first is None:
                    self.t_first = now
        rc = self.proc.poll()
        if rc is not None:
            self._ended(rc)
            return False
        if now - self.t_rss >= 1.0:
            self.t_rss = now
            r = rss_bytes(self.proc.pid)
            if r is not None:
                self.rss.append((now - self.t_start, r))
        if self.counter is not None and now - self.t_last_progress > self.soak.args.watchdog:
            log(f"{self.name}: no journal progress for {self.soak.args.watchdog:.0f} s: a hang; killing it")
            self.kill("watchdog")
            return False
        return True

    def kill(self, why: str) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.ended_by = why
        self._ended(self.proc.wait())
        if self.counter is not None:  # records that landed before the kill
            self.records = max(self.records, self.counter.count() - self.base)

    def _ended(self, rc: int) -> None:
        if self.t_end is None:
            self.t_end = time.monotonic()
            self.rc = rc
            self.soak.live.discard(self.proc)

    def run(self, on_poll: Callable[[Segment], str | None] | None = None) -> Segment:
        """Watch until the process ends; ``on_poll`` may return "kill" (a planned SIGKILL)."""
        while self.poll():
            if on_poll is not None and on_poll(self) == "kill":
                self.kill("sigkill")
                break
            time.sleep(0.2)
        if self.counter is not None:
            self.records = max(self.records, self.counter.count() - self.base)
        return self

    def stderr_text(self) -> str:
        return ANSI.sub("", self.err_path.read_text(errors="replace")) if self.err_path.exists() else ""

    def message(self) -> str | None:
        """The last line on stderr that is not a progress bar, a per-image failure or the demo warning
        (the error that ended the run), else the last line on stdout (the run's summary)."""
        lines = [ln.strip() for ln in self.stderr_text().splitlines() if ln.strip()]
        skip = ("locating", "warning: bundle", "failed ")
        keep = [ln for ln in lines if not ln.startswith(skip) and "img/s" not in ln]
        if keep:
            return keep[-1]
        out = self.out_path.read_text(errors="replace") if self.out_path.exists() else ""
        out_lines = [ln.strip() for ln in ANSI.sub("", out).splitlines() if ln.strip()]
        return (out_lines or lines or [None])[-1]

    def summary(self) -> dict[str, Any]:
        wall = (self.t_end or time.monotonic()) - self.t_start
        out: dict[str, Any] = {
            "name": self.name,
            "args": self.soak.show(self.argv),
            "exit_code": self.rc,
            "ended_by": self.ended_by or "exit",
            "seconds": round(wall, 1),
            "records_written": self.records,
        }
        if self.t_first is not None:
            out["first_record_s"] = round(self.t_first - self.t_start, 1)
            out["images_per_s"] = round(self.records / wall, 3) if wall > 0 else None
            # records come in bursts of up to --in-flight: a rate between first and last needs several
            if (
                self.records >= 3 * self.soak.args.in_flight
                and self.t_last_record
                and self.t_last_record > self.t_first
            ):
                out["steady_images_per_s"] = round((self.records - 1) / (self.t_last_record - self.t_first), 3)
        if self.rss:
            out["peak_rss_mb"] = round(max(r for _, r in self.rss) / 2**20, 1)
        err = self.stderr_text()
        out["traceback"] = "Traceback (most recent call last)" in err
        if self.ended_by is None:
            out["message"] = self.message()
        if out["traceback"]:
            out["stderr_tail"] = err[-1500:]
        return out


# --------------------------------------------------------------------------------------------------
# Journal checks


def read_lines(path: Path) -> dict[str, Any]:
    """Every complete line of a journal parsed; counts of invalid lines and torn tail bytes."""
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1
    records, invalid = [], []
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            records.append(rec)
        except ValueError as exc:
            invalid.append(f"line {n}: {exc}")
    return {"records": records, "invalid": invalid, "torn_tail_bytes": len(data) - end}


def latest_by_path(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        out.pop(str(r.get("path")), None)
        out[str(r.get("path"))] = r
    return out


def check_journal(records: list[dict[str, Any]], inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Records vs inputs (exactly one latest record each), errors, duplicates and sha256 identity."""
    by_path = {e["path"]: e for e in inputs}
    latest = latest_by_path(records)
    raw = Counter(str(r.get("path")) for r in records)
    missing = [p for p in by_path if p not in latest]
    extra = [p for p in latest if p not in by_path]
    real = Counter(os.path.realpath(p) for p in latest)  # one file under two spellings of its path
    statuses = Counter(r.get("status") for r in latest.values())
    corrupt = [e for e in inputs if e["corrupt"]]
    corrupt_bad = [e["path"] for e in corrupt if latest.get(e["path"], {}).get("status") != "error"]
    valid_failed = [
        r for p, r in latest.items() if p in by_path and not by_path[p]["corrupt"] and r.get("status") != "ok"
    ]
    sha_bad = [
        p
        for p, r in latest.items()
        if p in by_path and r.get("image_sha256") and r.get("image_sha256") != by_path[p]["sha256"]
    ]
    sha_missing = [p for p, r in latest.items() if p in by_path and by_path[p]["bytes"] and not r.get("image_sha256")]
    return {
        "inputs": len(by_path),
        "latest_records": len(latest),
        "missing": len(missing),
        "missing_examples": missing[:5],
        "extra": len(extra),
        "extra_examples": extra[:5],
        "exactly_one_each": not missing and not extra,
        "status_counts": dict(statuses),
        "corrupt_inputs": len(corrupt),
        "corrupt_recorded_as_error": len(corrupt) - len(corrupt_bad),
        "corrupt_not_error_examples": corrupt_bad[:5],
        "valid_inputs_failed": len(valid_failed),
        "valid_failed_by_error": dict(Counter(str(r.get("error")) for r in valid_failed)),
        "valid_failed_examples": [f"{r.get('path')}: {r.get('message')}"[:300] for r in valid_failed[:5]],
        "raw_records": len(records),
        "raw_duplicate_paths": sum(1 for c in raw.values() if c > 1),
        "raw_extra_records": sum(c - 1 for c in raw.values() if c > 1),
        "latest_duplicates": sum(c - 1 for c in real.values() if c > 1),
        "sha256_mismatch": len(sha_bad),
        "sha256_missing": len(sha_missing),
    }


# --------------------------------------------------------------------------------------------------
# The soak


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.rng = random.Random(args.seed + 1)
        self.live: set[subprocess.Popen[bytes]] = set()
        self.mounts: list[Path] = []
        self.findings: list[str] = []
        self.segments: list[Segment] = []
        self.writer_overlap = 0  # records a non-refused second writer may have written twice
        self.fault_mode = 0o644  # the damaged file's mode, restored after chmod 000
        self.env = dict(os.environ, NO_COLOR="1", COLUMNS="160", PYTHONUNBUFFERED="1")
        self.cmd = shlex.split(args.clue2geo) if args.clue2geo else [_clue2geo_exe()]
        self.cmd_len = len(self.cmd)
        self.images = work / "images"
        self.journal = work / "results.jsonl"
        self.bundle = work / "bundle"

    # --- helpers ---------------------------------------------------------------------------------

    def locate_argv(self, sources: list[str], out: Path, *extra: str, bundle: Path | None = None) -> list[str]:
        a = self.args
        argv = [*self.cmd, "locate", *sources, "--bundle", str(bundle or self.bundle), "--out", str(out)]
        argv += ["--in-flight", str(a.in_flight), "--device", a.device]
        argv += ["--max-cue-tokens", str(a.max_cue_tokens), "--max-answer-tokens", str(a.max_answer_tokens)]
        return argv + list(extra) + shlex.split(a.extra)

    def start(self, name: str, argv: list[str], journal: Path | None, main: bool = True) -> Segment:
        log(f"{name}: {self.show(argv)}")
        seg = Segment(self, name, argv, journal)
        if main:
            self.segments.append(seg)
        return seg

    def done(self, seg: Segment) -> dict[str, Any]:
        s = seg.summary()
        log(
            f"{seg.name}: exit {s['exit_code']} ({s['ended_by']}) after {s['seconds']} s, "
            f"{s['records_written']} records" + (f"; {s['message']}" if s.get("message") else "")
        )
        if s["traceback"] and seg.ended_by is None:
            self.findings.append(f"{seg.name}: a traceback on stderr (exit {s['exit_code']})")
        if seg.ended_by == "watchdog":
            self.findings.append(f"{seg.name}: hang (no journal progress for {self.args.watchdog:.0f} s)")
        return s

    def remaining(self) -> int:
        """Inputs without a record yet in the main journal."""
        done = {str(r.get("path")) for r in read_lines(self.journal)["records"]}
        return sum(1 for e in self.inputs if e["path"] not in done)

    def show(self, argv: list[str]) -> str:
        """A command line for the log and the JSON, long lists of input files shortened."""
        args = argv[self.cmd_len :]
        files = [a for a in args[1:] if a.startswith(str(self.images) + os.sep)]
        shown = " ".join(shlex.quote(a) for a in args if a not in files or len(files) <= 4)
        return shown.replace(args[0], f"{args[0]} <{len(files)} input files>", 1) if len(files) > 4 else shown

    def cli(self, *argv: str) -> dict[str, Any]:
        try:
            p = subprocess.run(
                [*self.cmd, *argv], capture_output=True, text=True, env=self.env, timeout=self.args.watchdog
            )
        except subprocess.TimeoutExpired:
            self.findings.append(f"clue2geo {' '.join(argv[:2])}: still running after {self.args.watchdog:.0f} s")
            return {"exit_code": None, "output": f"hang: killed after {self.args.watchdog:.0f} s", "full": ""}
        text = ANSI.sub("", (p.stdout + p.stderr).strip())
        return {"exit_code": p.returncode, "output": text.splitlines()[-1] if text else "", "full": text}

    # --- bundle copy -----------------------------------------------------------------------------

    def copy_bundle(self, src: Path) -> Path:
        """Hard-link the bundle into the work folder (copy where links fail), with the file to be
        damaged always copied, so the original bundle is never touched."""
        target = self.fault_target(src)
        for root, _dirs, files in os.walk(src):
            rel = Path(root).relative_to(src)
            (self.bundle / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                s, d = Path(root) / f, self.bundle / rel / f
                if target is not None and (rel / f).as_posix() == target:
                    shutil.copy2(s, d)
                    continue
                try:
                    os.link(s, d)
                except OSError:
                    shutil.copy2(s, d)
        return self.bundle

    def fault_target(self, src: Path) -> str | None:
        """The bundle file to damage: --fault-file, else the first DuckDB database listed (the reference
        gallery's metadata, read when the gallery loads), else the smallest listed component file."""
        if self.args.fault_file:
            return self.args.fault_file
        try:
            manifest = json.loads((src / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        comps = manifest.get("components") or []
        if isinstance(comps, dict):
            comps = list(comps.values())
        files = [
            (str(f.get("path")), int(f.get("bytes") or 0))
            for comp in comps
            if isinstance(comp, dict)
            for f in (comp.get("files") or {}).values()
            if isinstance(f, dict)
        ]
        for path, _ in files:
            if path.endswith(".duckdb"):
                return path
        return min(files, key=lambda f: f[1])[0] if files else None

    # --- phases ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        a = self.args
        out: dict[str, Any] = {"bench": "soak", "config": self.config()}
        log(f"work folder {self.work}; generating {a.images} inputs (seed {a.seed})")
        t = time.monotonic()
        self.inputs = generate(self.images, a.images, a.seed)
        out["inputs"] = self.describe_inputs(time.monotonic() - t)
        (self.work / "inputs.json").write_text(json.dumps(self.inputs, indent=1))
        self.copy_bundle(Path(a.bundle))
        out["bundle_fault_file"] = self.fault_target(Path(a.bundle))

        t_main = time.monotonic()
        out["kills"], out["second_writer"] = self.killed_runs()
        out["bundle_fault"] = self.bundle_fault() if "bundle-fault" not in a.skip else {"skipped": "--skip"}
        final = self.start("final", self.locate_argv([str(self.images)], self.journal, "-r", "--resume"), self.journal)
        final.run()
        out["final_run"] = self.done(final)
        if final.rc not in (0, 3):
            self.findings.append(f"final run: exit {final.rc} (0 or 3 expected)")
        out["rss"] = self.rss_report(final)
        pre_retry = read_lines(self.journal)["records"]
        if "retry" not in a.skip:
            retry = self.start(
                "retry_failed",
                self.locate_argv([str(self.images)], self.journal, "-r", "--resume", "--retry-failed"),
                self.journal,
            )
            out["retry_failed_run"] = self.done(retry.run())
            if retry.rc not in (0, 3):
                self.findings.append(f"--retry-failed run: exit {retry.rc} (0 or 3 expected)")
        main_wall = time.monotonic() - t_main

        out["journal"] = self.check_main(pre_retry)
        out["throughput"] = self.throughput(final, main_wall)
        out["full_disk"] = self.full_disk() if "full-disk" not in a.skip else {"skipped": "--skip"}
        out["runs"] = [s.summary() for s in self.segments]
        out["hangs"] = sum(1 for s in self.segments if s.ended_by == "watchdog")
        out["findings"] = self.findings
        out["ok"] = not self.findings
        return out

    def config(self) -> dict[str, Any]:
        a = self.args
        keys = ("bundle", "images", "in_flight", "seed", "kills", "max_cue_tokens", "max_answer_tokens", "watchdog")
        cfg = {k: getattr(a, k) for k in keys} | {"device": a.device, "extra": a.extra, "skip": a.skip}
        cfg |= {"euid": os.geteuid(), "cpus": os.cpu_count(), "heic": HEIF, "command": " ".join(self.cmd)}
        return cfg

    def describe_inputs(self, seconds: float) -> dict[str, Any]:
        ok = [e for e in self.inputs if not e["corrupt"]]
        mp = sorted(e["size"][0] * e["size"][1] / 1e6 for e in ok)
        return {
            "count": len(self.inputs),
            "corrupt": dict(Counter(e["corrupt"] for e in self.inputs if e["corrupt"])),
            "by_format": dict(Counter(e["format"] for e in ok)),
            "by_mode": dict(Counter(e["mode"] for e in ok)),
            "with_gps": dict(
                Counter(str(e["gps"]) if not isinstance(e["gps"], list) else "ok" for e in ok if "gps" in e)
            ),
            "exif_rotated": sum(1 for e in ok if "orientation" in e),
            "megapixels": {"min": round(mp[0], 4), "median": round(mp[len(mp) // 2], 3), "max": round(mp[-1], 2)}
            if mp
            else None,
            "bytes": sum(e["bytes"] for e in self.inputs),
            "duplicate_contents": sum(1 for e in self.inputs if e["duplicate_bytes"]),
            "generate_s": round(seconds, 1),
            "heic": "included" if HEIF else "pillow-heif not installed: no HEIC inputs",
        }

    def killed_runs(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """--kills runs, each SIGKILLed at a random moment and then resumed; the second writer is tried
        during the first. Kill points are drawn so the runs after them still have about half the inputs."""
        a = self.args
        kills: list[dict[str, Any]] = []
        test_writer = "second-writer" not in a.skip
        writer: dict[str, Any] = {} if test_writer else {"skipped": "--skip"}

        def writer_pending() -> bool:
            return test_writer and "refused" not in writer

        budget = max(1, int(a.images * 0.4 / max(1, a.kills)))
        n_runs = max(a.kills, 1 if test_writer else 0)
        for k in range(n_runs):
            resume = ("--resume",) if k or self.journal.exists() else ()
            kill = k < a.kills
            # a quarter of the kills land while the model loads, the rest after a random record count,
            # then a random fraction of the time a record takes (so also mid-batch and mid-write)
            at_records = (0 if self.rng.random() < 0.25 else self.rng.randint(1, budget)) if kill else None
            if k == 0 and test_writer and at_records is not None:
                at_records = max(1, at_records)  # the second writer needs a loaded first writer
            plan: dict[str, Any] = {"run": k + 1, "kill_after_records": at_records}
            if at_records == 0:
                plan["kill_after_s"] = round(self.rng.uniform(0.5, 20.0), 2)
            state: dict[str, Any] = {"kill_at": None, "jitter": self.rng.random()}

            def on_poll(seg: Segment, plan: dict[str, Any] = plan, state: dict[str, Any] = state) -> str | None:
                now = time.monotonic()
                if seg.name == "run1" and writer_pending():
                    if not self.second_writer(seg, writer):
                        return None  # judge the second writer before killing the first
                if plan["kill_after_records"] is None:
                    return None
                if state["kill_at"] is None:
                    if plan["kill_after_records"] == 0:
                        state["kill_at"] = seg.t_start + plan["kill_after_s"]
                    elif seg.records >= plan["kill_after_records"]:
                        gap = (now - seg.t_start) / seg.records
                        state["kill_at"] = now + state["jitter"] * min(gap, 10.0)
                return "kill" if state["kill_at"] is not None and now >= state["kill_at"] else None

            seg = self.start(
                f"run{k + 1}", self.locate_argv([str(self.images)], self.journal, "-r", *resume), self.journal
            )
            seg.run(on_poll)
            if k == 0 and writer_pending():
                while not self.second_writer(seg, writer):  # run1 ended before the writer was judged
                    time.sleep(0.2)
            s = self.done(seg)
            plan |= {
                "killed": seg.ended_by == "sigkill",
                "exit_code": s["exit_code"],
                "seconds": s["seconds"],
                "records": s["records_written"],
            }
            torn = read_lines(self.journal)["torn_tail_bytes"]
            if torn:
                plan["torn_tail_bytes_after_kill"] = torn
            kills.append(plan)
            if not kill and seg.rc not in (0, 3):
                self.findings.append(f"run{k + 1}: exit {seg.rc}")
        return kills, writer

    def second_writer(self, first: Segment, result: dict[str, Any]) -> bool:
        """Start a second ``locate --resume`` on the same --out once the first has written a record; True
        once it is judged: refused (it exited non-zero on its own, not 3), or not refused (it finished,
        or still ran after max(60 s, 2 x the first writer's time to its first record))."""
        w: Segment | None = result.get("_seg")
        if w is None:
            if first.records < 1 and first.t_end is None:
                return False
            argv = self.locate_argv([str(self.images)], self.journal, "-r", "--resume")
            w = self.start("second_writer", argv, None, main=False)
            result["_seg"] = w
            result["first_writer_running"] = first.t_end is None
            result["_before"] = len(read_lines(self.journal)["records"])
            return False
        limit = max(60.0, 2 * ((first.t_first or time.monotonic()) - first.t_start))
        if w.poll() and time.monotonic() - w.t_start < min(limit, self.args.watchdog):
            return False
        if w.t_end is None:
            w.kill("sigkill")
        del result["_seg"]
        s = w.summary()
        records = read_lines(self.journal)["records"][result.pop("_before") :]
        dup = Counter(str(r.get("path")) for r in records)
        refused = w.ended_by is None and w.rc not in (0, 3)
        result |= {
            "refused": refused,
            "exit_code": w.rc,
            "seconds": s["seconds"],
            "message": w.message(),
            "traceback": s["traceback"],
            "records_while_both_ran": len(records),
            "paths_recorded_twice_meanwhile": sum(1 for c in dup.values() if c > 1),
        }
        if w.ended_by == "sigkill":
            result["note"] = f"still running after {s['seconds']} s: killed"
        log(f"second writer: {'refused' if refused else 'NOT refused'} (exit {w.rc}): {w.message()}")
        if not refused:
            self.writer_overlap = len(records)
            self.findings.append(f"second writer on the same --out was not refused ({result.get('note') or w.rc})")
        elif s["traceback"]:
            self.findings.append("second writer: refused with a traceback instead of a message")
        return True

    def bundle_fault(self) -> dict[str, Any]:
        """Make one bundle file unreadable mid-run, observe, restart on the damaged bundle, restore."""
        target = self.fault_target(Path(self.args.bundle))
        if target is None:
            return {"skipped": "not possible here: no component file found in the bundle manifest"}
        path = self.bundle / target
        root = os.geteuid() == 0
        how = (
            "replaced by a truncated copy (rename over it; running as root, which ignores chmod 000)"
            if root
            else "chmod 000"
        )
        res: dict[str, Any] = {"file": target, "fault": how}
        at = self.rng.randint(1, max(1, self.args.images // 20))
        after_max = max(2, self.args.images // 20)
        state: dict[str, Any] = {}

        def on_poll(seg: Segment) -> str | None:
            now = time.monotonic()
            if "t" not in state:
                if seg.records >= at:
                    self.damage(path, root)
                    state.update(t=now, records=seg.records)
                    log(f"bundle fault: {target} {how}, after {seg.records} records")
                return None
            if seg.records - state["records"] >= after_max or now - state["t"] > self.args.fault_observe:
                return "kill"
            return None

        if self.remaining() == 0:
            return {"skipped": "every input already has a record (use more --images)"}
        seg = self.start(
            "bundle_fault", self.locate_argv([str(self.images)], self.journal, "-r", "--resume"), self.journal
        )
        seg.run(on_poll)
        s = self.done(seg)
        if "t" not in state:  # the run ended before the fault point
            self.damage(path, root)
            state.update(t=time.monotonic(), records=seg.records)
        res["during_run"] = {
            "records_before_fault": state["records"],
            "records_after_fault": seg.records - state["records"],
            "exit_code": s["exit_code"],
            "ended_by": s["ended_by"],
            "message": s.get("message"),
            "traceback": s["traceback"],
        }
        restart = self.start(
            "restart_damaged_bundle", self.locate_argv([str(self.images)], self.journal, "-r", "--resume"), self.journal
        )
        restart.run(lambda seg: "kill" if seg.records >= 1 else None)
        r = self.done(restart)
        res["restart"] = {
            "exit_code": r["exit_code"],
            "ended_by": r["ended_by"],
            "seconds": r["seconds"],
            "records": r["records_written"],
            "message": restart.message(),
            "traceback": r["traceback"],
        }
        refused = restart.ended_by is None and restart.rc == 1 and not r["traceback"]
        res["restart"]["clean_refusal"] = refused
        if not refused:
            self.findings.append(
                f"restart on a damaged bundle ({target}): exit {restart.rc}, {r['records_written']} records, "
                f"traceback {r['traceback']} (a one-line refusal, exit 1, expected)"
            )
        self.restore(path, Path(self.args.bundle) / target, root)
        res["restored"] = True
        return res

    def damage(self, path: Path, root: bool) -> None:
        if not root:
            self.fault_mode = path.stat().st_mode & 0o7777
            path.chmod(0)
            return
        data = path.read_bytes()
        tmp = path.with_name(path.name + ".soak-tmp")
        tmp.write_bytes(data[: len(data) // 2])
        os.replace(tmp, path)

    def restore(self, path: Path, original: Path, root: bool) -> None:
        if not root:
            path.chmod(self.fault_mode)
            return
        tmp = path.with_name(path.name + ".soak-tmp")
        shutil.copy2(original, tmp)
        os.replace(tmp, path)

    def rss_report(self, seg: Segment) -> dict[str, Any]:
        """Second-quarter vs last-quarter mean RSS of the run (by time): flat when within 10 %."""
        samples = seg.rss
        if len(samples) < 8:
            return {"samples": len(samples), "note": "run too short for quarters (use more --images)"}
        wall = samples[-1][0]
        q = [
            [r for t, r in samples if i * wall / 4 <= t < (i + 1) * wall / 4 or (i == 3 and t == wall)]
            for i in range(4)
        ]
        mean = [sum(x) / len(x) / 2**20 if x else None for x in q]
        out: dict[str, Any] = {"samples": len(samples), "seconds": round(wall, 1)}
        out["quarter_mean_mb"] = [round(m, 1) if m is not None else None for m in mean]
        out["peak_mb"] = round(max(r for _, r in samples) / 2**20, 1)
        step = max(1, len(samples) // 40)
        out["series_s_mb"] = " ".join(f"{t:.0f}:{r / 2**20:.0f}" for t, r in samples[::step])
        if mean[1] and mean[3]:
            change = (mean[3] - mean[1]) / mean[1]
            out["last_vs_second_quarter"] = round(change, 4)
            out["flat"] = abs(change) <= 0.10
            if not out["flat"]:
                self.findings.append(f"RSS not flat: last quarter {change:+.1%} vs the second")
        return out

    def throughput(self, final: Segment, main_wall: float) -> dict[str, Any]:
        s = final.summary()
        written = sum(seg.records for seg in self.segments)
        busy = sum(((seg.t_end or time.monotonic()) - seg.t_start) for seg in self.segments)
        return {
            "final_run_images_per_s": s.get("images_per_s"),
            "final_run_steady_images_per_s": s.get("steady_images_per_s"),
            "overall_inputs_per_s": round(len(self.inputs) / main_wall, 3),
            "overall_note": "inputs / wall time of every run on the main journal, model loads and faults included",
            "records_written": written,
            "seconds_in_runs": round(busy, 1),
        }

    def check_main(self, pre_retry: list[dict[str, Any]]) -> dict[str, Any]:
        lines = read_lines(self.journal)
        res = check_journal(lines["records"], self.inputs)
        res["invalid_lines"] = lines["invalid"][:5]
        res["torn_tail_bytes"] = lines["torn_tail_bytes"]
        pre = Counter(str(r.get("path")) for r in pre_retry)
        res["raw_extra_records_before_retry"] = sum(c - 1 for c in pre.values() if c > 1)
        res["raw_extra_note"] = (
            "a path recorded again is expected only from --retry-failed (its errors) and a non-refused second writer"
        )
        v = self.cli("audit", "verify", str(self.journal))
        res["audit_verify"] = {"exit_code": v["exit_code"], "output": v["output"][:300]}
        csv_path = self.work / "export.csv"
        e = self.cli("export", str(self.journal), "--to", str(csv_path))
        rows: list[dict[str, str]] = []
        if e["exit_code"] == 0 and csv_path.exists():
            with open(csv_path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        paths = Counter(r.get("path") for r in rows)
        res["export_csv"] = {
            "exit_code": e["exit_code"],
            "rows": len(rows),
            "distinct_paths": len(paths),
            "paths_twice": sum(1 for c in paths.values() if c > 1),
        }
        f = self.findings
        if not res["exactly_one_each"]:
            f.append(f"journal: {res['missing']} inputs without a record, {res['extra']} records for no input")
        if res["corrupt_recorded_as_error"] != res["corrupt_inputs"]:
            f.append(f"corrupt inputs not recorded as errors: {res['corrupt_not_error_examples']}")
        if res["valid_inputs_failed"]:
            f.append(f"{res['valid_inputs_failed']} valid inputs failed: {res['valid_failed_examples'][:2]}")
        if res["latest_duplicates"]:
            f.append(f"{res['latest_duplicates']} files recorded under two paths in the latest view")
        if res["sha256_mismatch"] or res["sha256_missing"]:
            f.append(f"sha256: {res['sha256_mismatch']} mismatched, {res['sha256_missing']} missing")
        if lines["invalid"]:
            f.append(f"journal: {len(lines['invalid'])} unreadable lines, e.g. {lines['invalid'][0]}")
        if v["exit_code"] != 0:
            f.append(f"audit verify: exit {v['exit_code']}: {v['output'][:200]}")
        if e["exit_code"] != 0 or len(rows) != len(self.inputs) or res["export_csv"]["paths_twice"]:
            f.append(f"export --to csv: exit {e['exit_code']}, {len(rows)} rows for {len(self.inputs)} inputs")
        unexplained = res["raw_extra_records_before_retry"] - self.writer_overlap
        if unexplained > 0:
            f.append(f"{unexplained} records written again for inputs already recorded (before --retry-failed)")
        return res

    def full_disk(self) -> dict[str, Any]:
        """A run whose --out lies on an almost full tmpfs: exit code, message, journal intact; then
        space freed and --resume to completion."""
        mnt = self.work / "fullfs"
        mnt.mkdir()
        why = self.mount_tmpfs(mnt)
        if why:
            return {"skipped": f"not possible here: {why}"}
        try:
            return self._full_disk(mnt)
        finally:
            self.umount(mnt)

    def mount_tmpfs(self, mnt: Path) -> str | None:
        if os.geteuid() != 0:
            return f"mounting a small tmpfs needs root (running as uid {os.geteuid()})"
        if shutil.which("mount") is None:
            return "no mount command"
        p = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True
        )
        if p.returncode != 0:
            return f"mount -t tmpfs failed: {(p.stderr or p.stdout).strip()[:200]}"
        self.mounts.append(mnt)
        try:  # check it is really a small filesystem of its own
            probe = mnt / "probe"
            probe.write_bytes(b"x")
            probe.unlink()
            st = os.statvfs(mnt)
            if st.f_blocks * st.f_frsize > 8 * 2**20:
                return f"the tmpfs mounted at {mnt} is not small ({st.f_blocks * st.f_frsize} bytes)"
        except OSError as exc:
            return f"the tmpfs at {mnt} is not writable: {exc}"
        return None

    def umount(self, mnt: Path) -> None:
        if mnt in self.mounts:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
            self.mounts.remove(mnt)

    def _full_disk(self, mnt: Path) -> dict[str, Any]:
        n = min(self.args.full_disk_images, len(self.inputs))
        subset = self.inputs[:n]
        if not any(e["corrupt"] for e in subset):
            subset = subset[:-1] + [next((e for e in self.inputs if e["corrupt"]), self.inputs[n - 1])]
        main = read_lines(self.journal)["records"]
        per_record = int(sum(len(json.dumps(r, ensure_ascii=False)) + 1 for r in main) / max(1, len(main))) or 4096
        room = max(4096, 4 * per_record)
        st = os.statvfs(mnt)
        filler = mnt / "filler"
        with open(filler, "wb") as fh:
            left = st.f_bavail * st.f_frsize - room
            chunk = b"\0" * 65536
            try:
                while left > 0:
                    left -= fh.write(chunk[: min(len(chunk), left)])
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                pass
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        journal = mnt / "full.jsonl"
        res: dict[str, Any] = {"tmpfs": "2 MiB", "free_bytes_at_start": free, "record_bytes_avg": per_record}
        res["inputs"] = len(subset)
        sources = [e["path"] for e in subset]
        seg = self.start("disk_full", self.locate_argv(sources, journal), journal)
        seg.run()
        s = self.done(seg)
        lines = read_lines(journal)
        res["run"] = {
            "exit_code": s["exit_code"],
            "ended_by": s["ended_by"],
            "records": len(lines["records"]),
            "message": s.get("message"),
            "traceback": s["traceback"],
            "invalid_lines": len(lines["invalid"]),
            "torn_tail_bytes": lines["torn_tail_bytes"],
        }
        clean = seg.rc == 1 and not s["traceback"] and len(lines["records"]) < len(subset)
        res["run"]["clean_stop"] = clean
        if not clean:
            self.findings.append(
                f"disk full: exit {seg.rc}, traceback {s['traceback']}, {len(lines['records'])}/{len(subset)} records "
                "(exit 1 with one line, before the end, expected)"
            )
        if lines["invalid"]:
            self.findings.append(f"disk full: {len(lines['invalid'])} unreadable journal lines")
        filler.unlink()
        resume = self.start("disk_full_resume", self.locate_argv(sources, journal, "--resume"), journal)
        resume.run()
        r = self.done(resume)
        after = read_lines(journal)
        chk = check_journal(after["records"], subset)
        v = self.cli("audit", "verify", str(journal))
        res["resume"] = {
            "exit_code": r["exit_code"],
            "records": chk["latest_records"],
            "exactly_one_each": chk["exactly_one_each"],
            "corrupt_recorded_as_error": f"{chk['corrupt_recorded_as_error']}/{chk['corrupt_inputs']}",
            "torn_tail_bytes": after["torn_tail_bytes"],
            "invalid_lines": len(after["invalid"]),
            "audit_verify": {"exit_code": v["exit_code"], "output": v["output"][:300]},
        }
        if resume.rc not in (0, 3) or not chk["exactly_one_each"] or v["exit_code"] != 0:
            self.findings.append(
                f"disk full, after freeing space: resume exit {resume.rc}, exactly one each "
                f"{chk['exactly_one_each']}, audit verify exit {v['exit_code']}"
            )
        return res


def _clue2geo_exe() -> str:
    beside = Path(sys.executable).with_name("clue2geo")
    return str(beside) if beside.exists() else shutil.which("clue2geo") or "clue2geo"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", default="artifacts/demo", help="bundle directory (copied by hard links; never changed)")
    p.add_argument("--images", type=int, default=2000, help="generated inputs (1 in 50 corrupt)")
    p.add_argument("--workdir", default=None, help="work folder (must be absent or empty; default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (inputs, journals, logs)")
    p.add_argument("--in-flight", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs at random moments, each followed by --resume")
    p.add_argument("--max-cue-tokens", type=int, default=16)
    p.add_argument("--max-answer-tokens", type=int, default=16)
    p.add_argument("--watchdog", type=float, default=600.0, help="seconds without journal progress = a hang")
    p.add_argument("--fault-observe", type=float, default=60.0, help="seconds to watch a run after the bundle fault")
    p.add_argument("--fault-file", default=None, help="bundle-relative file to damage (default: gallery metadata)")
    p.add_argument("--full-disk-images", type=int, default=40, help="inputs of the full-disk run")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--extra", default="", help="more 'locate' arguments, e.g. '--no-verify'")
    p.add_argument("--clue2geo", default=None, help="command to run (default: the clue2geo beside this Python)")
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("second-writer", "bundle-fault", "full-disk", "retry"),
        help="leave out a step (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        work = Path(args.workdir).resolve()
        if work.exists() and any(work.iterdir()):
            sys.exit(f"--workdir {work} is not empty; give an absent or empty folder")
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="c2g-soak-")).resolve()
    if not (Path(args.bundle) / "manifest.json").is_file():
        sys.exit(f"--bundle {args.bundle}: no manifest.json there; build one (clue2geo bundle demo) or pass its path")
    soak = Soak(args, work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated soak still unmounts and cleans up
    try:
        summary = soak.run()
    finally:
        for proc in list(soak.live):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        for mnt in list(soak.mounts):
            soak.umount(mnt)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    summary["wall_s"] = round(time.monotonic() - T0, 1)
    summary["work_folder"] = str(work) if args.keep else "deleted"
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
