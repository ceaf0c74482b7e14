import sys, re
sys.path.insert(0, "docs/plans/issue-20")
from move import MOVES
rows = [l.rstrip("\n").split("\t") for l in open("docs/plans/issue-20/tools/inner_imports.txt")]
def new_path(where):
    f, line = where.split(":")
    rel = f.split("clue2geo_sdk/", 1)[1]
    return f"{MOVES.get(rel, rel)}:{line}"
LIGHT = {"tokenizers": "0.06 s", "cryptography": "0.08 s", "defusedxml": "0.06 s", "rich": "0.13 s, CLI only", "PIL": "already loaded by inputs.image"}
NATIVE = {"duckdb": "0.45 s", "shapely": "0.49 s", "shapefile": "with shapely", "onnxruntime": "0.30 s", "llguidance": "0.13 s"}
out = []
for where, ctx, stmt in rows:
    m = re.match(r"(?:from|import) (\S+)", stmt)
    mod = m.group(1)
    top = mod.lstrip(".").split(".")[0]
    if "TYPE_CHECKING" in ctx:
        if ".answers" in stmt:
            v = "gone: `Answer` moves into results.py (the cycle answers <-> results ends)"
        elif ".job" in stmt:
            v = "stays under TYPE_CHECKING: cluster.job imports ray at its top"
        else:
            v = "stays under TYPE_CHECKING (annotations only)"
    elif mod.startswith("."):
        if where.startswith("clue2geo_sdk/__init__.py") or (where.startswith("clue2geo_sdk/cluster/__init__.py")):
            v = "**stays**: cluster.job imports ray (the cluster extra) at its top; `import clue2geo_sdk` needs no ray"
        elif "answers" in stmt and "results.py" in where:
            v = "gone: `Answer` is in results.py"
        elif "batch import discover" in stmt:
            v = "top: `from ..inputs.discover import discover` (the cycle batch -> geolocator -> reference_gallery -> batch ends)"
        elif "reference_gallery import PhotoGallery" in stmt and "geolocator" in where:
            v = "top: `from .retrieval.photos import PhotoGallery` (no cycle once discover is in inputs/)"
        elif "_heif_available" in stmt:
            v = "top: `from ..image import heif_available` (public; no cycle: image imports no metadata)"
        elif "_native" in stmt:
            v = "top: `from .._native import usearch_index` (_native imports nothing; the native load stays inside its accessor)"
        elif "cluster" in stmt and "job" not in stmt:
            v = "top: cluster/__init__ and cluster.shards import no ray (test_cluster checks)"
        elif where.startswith("clue2geo_sdk/engines/__init__"):
            v = "top: batched/chat import llama_cpp only through load_llama_cpp (test_portable checks)"
        else:
            v = "top (no cycle in the new layout; nothing heavy at import)"
    elif top in ("ray",):
        v = "top of cluster/job.py (it imports ray at its top already)"
    elif top == "pyarrow":
        v = "**stays**: pyarrow comes with the cluster extra (ray[data]); shards is imported without it"
    elif top == "pillow_heif":
        v = "**stays**: optional HEIF plugin, registered on the first HEIF/AVIF file only"
    elif top in ("llama_cpp", "usearch"):
        v = "**stays in _native.py / after load_llama_cpp**: libstdc++ must be loaded first (segfaults otherwise; test_portable checks llama_cpp is not imported at import)"
    elif top == "fcntl":
        v = "module level already (try/except ImportError: POSIX only); not a function import"
    elif top in LIGHT:
        v = f"top ({LIGHT[top]})"
    elif top in NATIVE:
        v = f"decision: top costs {NATIVE[top]} on every `import clue2geo_sdk`; recommended: an accessor in _native.py (see §3)"
    else:
        v = "?"
    out.append(f"| `{where}` | `{new_path(where)}` | {ctx} | `{stmt[:70]}` | {v} |")
print("| now | after the move | inside | import | verdict |")
print("|---|---|---|---|---|")
print("\n".join(out))
