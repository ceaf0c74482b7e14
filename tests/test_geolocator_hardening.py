"""Issue 19, the geolocator's part: the load-time memory check counts the KV cache (sized from the
GGUF header, checked against llama.cpp's own figures) on every device setting; options are finite;
the location schema's coordinate patterns; journal records read back as predictions; every SDK error
exported; public calls raise only Clue2GeoError subclasses."""

from __future__ import annotations

import ast
import builtins
import ctypes
import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST

import clue2geo_sdk
from clue2geo_sdk import (
    Bundle,
    Clue2GeoError,
    DeviceError,
    ImageLoadError,
    InsufficientMemoryError,
    InvalidArgumentError,
    Options,
    OptionsError,
    Prediction,
    RecordFormatError,
)
from clue2geo_sdk.engines.memory import available_memory, memory_need
from clue2geo_sdk.geolocator import Geolocator

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


# -- the memory check: KV cache sized from the GGUF header, as llama.cpp sizes it -------------------


@pytest.fixture
def llama_log() -> Iterator[Callable[[], list[str]]]:
    """A reader of llama.cpp's and mtmd's log lines so far (the SDK's silencing is restored after)."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from clue2geo_sdk.engines import base

    pieces: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: object) -> None:
        pieces.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    mtmd.mtmd_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lambda: "".join(pieces).splitlines()
    finally:
        base.silence_native_logs()
        llama_cpp.llama_log_set(base._SILENT_CALLBACK, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(base._SILENT_CALLBACK, ctypes.c_void_p(0))


def _mib(lines: list[str], pattern: str) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.search(pattern, line))]


@pytest.mark.parametrize(("engine", "in_flight", "samples"), [("batched", 2, 1), ("batched", 1, 3), ("chat", 3, 1)])
def test_kv_cache_and_buffers_match_llama_cpp(
    demo_bundle: Path, engine: str, in_flight: int, samples: int, llama_log: Callable[[], list[str]]
) -> None:
    """The KV bytes the check counts (from the GGUF header alone) are those llama.cpp allocates for the
    same settings; its compute allowance covers llama.cpp's compute + output buffers (the real engine)."""
    import llama_cpp

    from clue2geo_sdk.engines import make_engine

    bundle = Bundle.open(demo_bundle)
    n_ctx = int(bundle.params("vlm")["n_ctx"])
    need = memory_need(bundle, engine=engine, max_in_flight=in_flight, samples_per_prompt=samples, device="cpu")
    vlm = make_engine(
        engine,
        bundle.file("vlm", "model"),
        bundle.file("vlm", "mmproj"),
        max_images=in_flight,
        ctx_per_image=n_ctx,
        samples_per_prompt=samples,
        n_gpu_layers=0,
        verbose=True,
    )
    try:
        model = vlm._model if engine == "batched" else vlm._llm.model  # type: ignore[attr-defined]
        # An independent expectation: the hparams llama.cpp read from the same file, f16 K and V.
        head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
        per_cell = 2 * 2 * llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model) * head_dim
    finally:
        vlm.close()
    lines = llama_log()
    kv = [
        m.groups()
        for s in lines
        if (m := re.search(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells.* (\d+)/\d+ seqs", s))
    ]
    assert len(kv) == 1, lines[-30:]
    mib, cells, seqs = float(kv[0][0]), int(kv[0][1]), int(kv[0][2])
    expected_seqs = in_flight * (1 + 5 * samples) if engine == "batched" else 1
    assert (seqs, cells) == (expected_seqs, n_ctx)  # llama.cpp's streams: one of n_ctx cells per sequence
    assert need.n_seq == expected_seqs and need.kv_cells == n_ctx * expected_seqs
    assert need.kv_bytes_per_cell == per_cell
    assert need.parts["KV cache"] == n_ctx * expected_seqs * per_cell
    assert abs(need.parts["KV cache"] / 2**20 - mib) < 0.01  # llama.cpp's own figure, printed to 0.01 MiB
    buffers = sum(_mib(lines, r"CPU compute buffer size = +([\d.]+) MiB")[:1]) + sum(
        _mib(lines, r"CPU +output buffer size = +([\d.]+) MiB")[:1]
    )
    assert buffers > 0 and need.parts["compute buffers"] / 2**20 >= buffers
    # the weights: llama.cpp's model buffers (mapped, and any tensors it repacked) within 2 %
    model_mib = sum(_mib(lines, r"CPU\w* model buffer size = +([\d.]+) MiB"))
    assert model_mib > 0 and abs(need.parts["vlm weights"] / 2**20 - model_mib) <= 0.02 * model_mib


def test_a_gguf_header_that_cannot_be_read_is_a_clue2geo_error(demo_bundle: Path, tmp_path: Path) -> None:
    from clue2geo_sdk import GGUFHeaderError
    from clue2geo_sdk.engines.gguf_header import tensor_bytes, text_model_shape

    model = Bundle.open(demo_bundle).file("vlm", "model")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model.read_bytes()[:4096])  # inside the tokenizer's arrays
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    for path, what in ((cut, "truncated"), (junk, "not a GGUF file")):
        for read in (text_model_shape, tensor_bytes):
            with pytest.raises(GGUFHeaderError, match=what):
                read(path)


def test_memory_need_counts_the_kv_cache_on_every_device(demo_bundle: Path) -> None:
    """The KV cache grows with images in flight and samples, and the count is the same (all in host
    memory, no GPU here) whether the device is "cpu" or "auto": the old check skipped "auto"."""
    bundle = Bundle.open(demo_bundle)
    one = memory_need(bundle, max_in_flight=1, device="cpu")
    four = memory_need(bundle, max_in_flight=4, device="cpu")
    assert four.parts["KV cache"] == 4 * one.parts["KV cache"] > 0
    assert memory_need(bundle, max_in_flight=1, samples_per_prompt=3, device="cpu").seqs_per_image == 16
    auto = memory_need(bundle, max_in_flight=4, device="auto")
    assert auto.parts["KV cache"] == four.parts["KV cache"] and auto.parts["vlm weights"] == four.parts["vlm weights"]
    weights = bundle.file("vlm", "model").stat().st_size
    assert 0.5 * weights < four.parts["vlm weights"] <= weights  # the tensors, without the tokenizer's header


def _big_context_copy(demo_bundle: Path, dst: Path, n_ctx: int) -> Path:
    """The demo bundle with another n_ctx in its manifest, its model files hard-linked (same bytes)."""
    for src in demo_bundle.rglob("*"):
        target = dst / src.relative_to(demo_bundle)
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif src.name != "manifest.json":
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, target)
    manifest = json.loads((demo_bundle / "manifest.json").read_text())
    for comp in manifest["components"]:
        if comp["role"] == "vlm":
            comp["params"]["n_ctx"] = n_ctx
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_impossible_in_flight_and_context_are_refused_with_the_numbers(
    demo_bundle: Path, tmp_path: Path, device: str
) -> None:
    """Weights alone fit (the old check passed); the KV cache of 42 images x 6 sequences x 2^20 cells
    cannot: refused before llama.cpp allocates, in one sentence with what it needs and what is free."""
    big = _big_context_copy(demo_bundle, tmp_path / "big", 1 << 20)
    bundle = Bundle.open(big)
    need = memory_need(bundle, max_in_flight=42, device=device)
    free = available_memory()
    assert free is not None and need.total > free  # the premise: impossible on this machine
    assert need.total - need.parts["KV cache"] < free  # ...because of the KV cache alone
    with pytest.raises(InsufficientMemoryError) as err:
        Geolocator.load(big, device=device, max_in_flight=42, **FAST)
    msg = str(err.value)
    assert isinstance(err.value, MemoryError) and "\n" not in msg
    assert f"about {need.total / GiB:.2f} GiB" in msg and "GiB is free" in msg
    assert f"KV cache {need.parts['KV cache'] / GiB:.2f}" in msg
    assert "42 images in flight x 6 sequences x n_ctx 1048576" in msg and f"device={device}" in msg
    assert "n_ctx" in msg and "max_in_flight" in msg


def test_too_many_images_in_flight_are_refused_and_the_suggestion_fits(demo_bundle: Path) -> None:
    """A million images in flight on the demo's own n_ctx: refused by the memory check (not by a native
    allocation), and the number of images it says fit does fit."""
    with pytest.raises(InsufficientMemoryError) as err:
        Geolocator.load(demo_bundle, device="auto", max_in_flight=1_000_000, **FAST)
    fits = int(re.search(r"at most (\d+) fit", str(err.value)).group(1))  # type: ignore[union-attr]
    bundle = Bundle.open(demo_bundle)
    free = available_memory()
    assert free is not None and 1 <= fits and memory_need(bundle, max_in_flight=fits).total <= free


# -- options: finite, typed, known -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"sample_temperature": math.nan},
        {"sample_temperature": math.inf},
        {"alpha": math.nan},
        {"alpha": -math.inf},
        {"max_cue_tokens": 1.5},
        {"max_answer_tokens": 0},
        {"samples_per_prompt": True},
        {"references": [5, 0]},
        {"references": "5,10"},
        {"use_cluemap": "no"},
        {"constrain": "sometimes"},
        {"region": 5},
        {"use_clue_map": False},
        {"image_tokens": 7},  # below what the vision tower takes, and not 0 (the bundle's budget)
        {"image_tokens": 4097},
        {"image_tokens": 512.0},
    ],
)
def test_options_refuse_bad_values_by_name(bad: dict) -> None:
    for make in (lambda: Options(**bad), lambda: Options.from_kwargs(**bad)):
        with pytest.raises(OptionsError) as err:
            make()
        assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)
        assert next(iter(bad)) in str(err.value)


def test_an_option_added_later_leaves_the_digest_alone_at_its_default() -> None:
    """Records, validations and known answers made before ``image_tokens`` existed keep matching."""
    before = {k: v for k, v in Options().to_dict().items() if k != "image_tokens"}
    assert Options().digest() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    assert Options(**before).digest() == Options().digest()
    assert Options(image_tokens=256).digest() != Options().digest()
    assert Options(image_tokens=256).to_dict()["image_tokens"] == 256


def test_options_keep_their_digest_and_take_numpy_numbers() -> None:
    opts = Options(alpha=np.float64(0.25), samples_per_prompt=np.int64(2), references=[np.int64(5)])
    assert opts == Options(alpha=0.25, samples_per_prompt=2, references=(5,))
    assert Options(**opts.to_dict()).digest() == opts.digest()
    assert json.loads(json.dumps(opts.to_dict()))["alpha"] == 0.25


# -- the JSON schema's coordinate patterns --------------------------------------------------------------


def _decimal_strings() -> list[str]:
    rng = np.random.default_rng(0)
    out = ["90.0000", "-90.000000", "90.0001", "90.5000", "-90.9999", "180.0000", "-180.000000", "180.0001"]
    out += ["180.5000", "179.999999", "-179.9999", "89.999999", "0.0000", "-0.0000", "99.1234", "100.1234"]
    for _ in range(4000):
        whole = int(rng.integers(0, 200))
        decimals = int(rng.integers(4, 7))
        frac = "".join(str(d) for d in rng.integers(0, 10, decimals))
        if rng.random() < 0.2:
            frac = "0" * decimals
        out.append(f"{'-' if rng.random() < 0.5 else ''}{whole}.{frac}")
    return out


def test_location_schema_coordinates_are_within_range() -> None:
    """jsonschema (an independent validator) accepts a latitude/longitude string exactly when its
    value is within [-90, 90] / [-180, 180]: 90.x and 180.x with nonzero decimals are refused."""
    import jsonschema

    from clue2geo_sdk.engines.ask import LOCATION_SCHEMA

    base = {"country": "X", "city": "Y", "landmark": "Z", "lat": "1.0000", "lon": "1.0000"}
    validator = jsonschema.Draft202012Validator(LOCATION_SCHEMA)
    for value in _decimal_strings():
        v = abs(Decimal(value))
        assert validator.is_valid({**base, "lat": value}) == (v <= 90), value
        assert validator.is_valid({**base, "lon": value}) == (v <= 180), value


# -- Prediction.from_dict on a journal record ------------------------------------------------------------


def test_prediction_from_a_journal_record(geo: Geolocator, photo: Path, tmp_path: Path) -> None:
    """A record written by the batch journal (the prediction plus path, status, hashes, identity)
    reads back as the same prediction; a failure record or a typo'd key is refused by name."""
    from clue2geo_sdk.runs.batch import run_batch
    from clue2geo_sdk.runs.journal import read_records

    out = tmp_path / "r.jsonl"
    run_batch(geo, [photo, tmp_path / "missing.jpg"], out)
    records = read_records(out)
    ok = next(r for r in records if r["status"] == "ok")
    assert {"path", "record_hash", "prev_hash", "bundle_digest"} <= ok.keys()
    pred = Prediction.from_dict(ok)
    fields = set(pred.to_dict())
    assert pred.to_dict() == {k: v for k, v in ok.items() if k in fields}
    assert Prediction.from_dict(json.loads(pred.to_json())) == pred
    failed = next(r for r in records if r["status"] != "ok")
    with pytest.raises(RecordFormatError, match="status 'error'"):
        Prediction.from_dict(failed)
    with pytest.raises(RecordFormatError, match="unknown keys \\['latt'\\]"):
        Prediction.from_dict({**pred.to_dict(), "latt": 1})
    with pytest.raises(RecordFormatError, match="missing keys"):
        Prediction.from_dict({k: v for k, v in ok.items() if k != "lat"})


# -- every SDK error exported; public calls raise Clue2GeoError subclasses ------------------------------


def _sdk_error_classes() -> set[str]:
    """Names of the exception classes defined anywhere in clue2geo_sdk that derive from Clue2GeoError
    (read from the source, so a new one that is not exported fails here)."""
    names: dict[str, list[str]] = {}
    for path in (ROOT / "clue2geo_sdk").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names[node.name] = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
    ours = {"Clue2GeoError"}
    grew = True
    while grew:
        grew = False
        for name, bases in names.items():
            if name not in ours and ours & set(bases):
                ours.add(name)
                grew = True
    return ours


def test_every_sdk_error_is_exported_and_is_also_a_builtin() -> None:
    errors = _sdk_error_classes()
    assert {"VLMError", "BundleSignatureError", "GalleryBuildError", "ClusterJobError", "SigningKeyError"} <= errors
    for name in sorted(errors):
        cls = getattr(clue2geo_sdk, name, None)
        assert isinstance(cls, type) and issubclass(cls, Clue2GeoError), f"{name} is not exported by clue2geo_sdk"
        if name != "Clue2GeoError":
            builtin = [b for b in cls.__mro__ if getattr(builtins, b.__name__, None) is b]
            assert set(builtin) - {Exception, BaseException, object}, f"{name} is not also a builtin exception"
    assert clue2geo_sdk.VLMError is __import__("clue2geo_sdk.engines.base", fromlist=["VLMError"]).VLMError


@pytest.mark.parametrize(
    "kwargs",
    [
        {"device": "gpu"},
        {"engine": "fast"},
        {"max_in_flight": 0},
        {"max_in_flight": "4"},
        {"max_in_flight": True},
        {"n_gpu_layers": -5},
        {"n_threads": 0},
        {"alpha": math.nan},
        {"bogus_option": 1},
    ],
)
def test_load_refuses_bad_arguments_before_opening_anything(tmp_path: Path, kwargs: dict) -> None:
    """Refused by name, as a Clue2GeoError, before the bundle is even looked for."""
    with pytest.raises(InvalidArgumentError) as err:
        Geolocator.load(tmp_path / "no-bundle-here", **kwargs)
    assert next(iter(kwargs)) in str(err.value)


def test_cuda_without_a_cuda_provider_is_a_device_error(tmp_path: Path) -> None:
    import onnxruntime as ort

    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # this test's premise: a CPU build
    with pytest.raises(DeviceError, match="no CUDA provider"):
        Geolocator.load(tmp_path / "no-bundle-here", device="cuda")


def test_bundle_settings_of_the_wrong_type_are_bundle_errors(demo_bundle: Path, tmp_path: Path) -> None:
    """A manifest whose n_ctx is not a number (given verify=False, so only the load reads it) is a
    BundleFormatError naming the key, not a ValueError from int()."""
    from clue2geo_sdk import BundleFormatError

    bad = _big_context_copy(demo_bundle, tmp_path / "bad", 4096)
    manifest = json.loads((bad / "manifest.json").read_text())
    next(c for c in manifest["components"] if c["role"] == "vlm")["params"]["n_ctx"] = "big"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="n_ctx"):
        Geolocator.load(bad, verify=False, device="cpu", **FAST)


def test_locate_refuses_bad_inputs_with_clue2geo_errors(geo: Geolocator) -> None:
    with pytest.raises(ImageLoadError):
        geo.locate(np.full((64, 64, 3), "x"))  # an array of strings: numpy's TypeError before
    with pytest.raises(ImageLoadError):
        geo.locate(12345)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="options="):
        geo.locate(ROOT / "examples" / "images" / "summer_palace_beijing.jpg", options="fast")  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="sample_temperature"):
        geo.locate(ROOT / "examples" / "images" / "summer_palace_beijing.jpg", options={"sample_temperature": math.inf})
    with pytest.raises(OptionsError, match="alpha"):
        geo.locate_many([], options={"alpha": 2.0})
    with pytest.raises(InvalidArgumentError, match="name="):
        geo.locate(ROOT / "examples" / "images" / "summer_palace_beijing.jpg", name=5)  # type: ignore[arg-type]


def test_a_polygon_region_given_to_options_is_warmed_before_threads_share_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Region built directly (not through Region.polygon, which warms it) is warmed by Options, on the
    caller's thread, so no locate thread is the first to use its prepared outline (GEOS issue 825)."""
    from clue2geo_sdk import Region

    square = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    region = Region(kind="polygon", name="sq", geometry=json.dumps(square, separators=(",", ":"), sort_keys=True))
    warmed: list[Region] = []
    monkeypatch.setattr(Region, "warm", lambda self: warmed.append(self))
    opts = Options(region=region)
    assert warmed == [region] and opts.region is region
    Options(region="bbox:0,0,1,1")
    assert warmed == [region]  # only polygons need it


class _GpuWheelWithoutCuda:
    """onnxruntime-gpu where CUDA's libraries do not load (measured: it lists the CUDA provider anyway
    and each session falls back to the CPU): the real CPU wheel, but claiming CUDA is available."""

    def __init__(self, real: object) -> None:
        self._real = real

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def get_available_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, path: str, sess_options: object = None, providers: object = None) -> object:  # noqa: N802
        return self._real.InferenceSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])


def test_cuda_that_falls_back_to_the_cpu_is_refused_for_cuda_and_logged_for_auto(
    demo_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    from clue2geo_sdk.engines import encoders

    monkeypatch.setattr(encoders, "onnxruntime_module", lambda: _GpuWheelWithoutCuda(ort))
    files = {k: demo_bundle / "sbert" / f for k, f in (("model", "model.onnx"), ("tokenizer", "tokenizer.json"))}
    params = json.loads((demo_bundle / "manifest.json").read_text())
    sbert = next(c for c in params["components"] if c["role"] == "sbert")["params"]
    with pytest.raises(DeviceError, match=r"device='cuda' but model.onnx: onnxruntime could not start CUDA"):
        encoders.SbertEncoder(files, sbert, encoders.device_providers("cuda"))
    with caplog.at_level("INFO", logger="clue2geo"):
        enc = encoders.SbertEncoder(files, sbert, encoders.device_providers("auto"))
    assert enc.encode(["a harbour"]).shape[0] == 1
    assert "could not start CUDA for it and runs it on CPUExecutionProvider" in caplog.text
