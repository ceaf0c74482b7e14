"""Where every top-level name of clue2geo_sdk goes (issue 20), with sizes: renders plan tables.

python placement.py ORIG_ROOT  -> markdown on stdout (per-module tables, then estimated new module sizes)
"""

import ast
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, "docs/plans/issue-20")
from move import MOVES  # noqa: E402

root = Path(sys.argv[1]) / "clue2geo_sdk"

# name -> new module, for names that do not follow their file (MOVES gives the default)
G = {  # groups, to keep the table short
    "journal": "runs/journal.py",
    "records": "runs/records.py",
    "resume": "runs/resume.py",
    "formats": "runs/formats.py",
    "discover": "inputs/discover.py",
    "parse": "bundle/parse.py",
    "writer": "bundle/writer.py",
    "options": "options.py",
    "memory": "engines/memory.py",
    "figures": "evidence/report/figures.py",
    "style": "evidence/report/style.py",
    "sections": "evidence/report/sections.py",
    "custody": "evidence/report/custody.py",
    "sources": "retrieval/sources.py",
    "build": "retrieval/photo_build.py",
    "coords": "retrieval/coordinates.py",
    "tiff": "inputs/metadata/tiff.py",
    "exif": "inputs/metadata/exif.py",
    "xmp": "inputs/metadata/xmp.py",
    "containers": "inputs/metadata/containers.py",
    "actor": "cluster/actor.py",
    "plan": "cluster/plan.py",
    "common": "cli/common.py",
    "plugins": "cli/plugins.py",
    "c_bundle": "cli/bundle.py",
    "c_locate": "cli/locate.py",
    "c_results": "cli/results.py",
    "c_eval": "cli/evaluate.py",
    "c_audit": "cli/audit.py",
    "c_inspect": "cli/inspect.py",
    "distance": "geo/distance.py",
    "results": "results.py",
    "files": "files.py",
    "selection": "pipeline/selection.py",
    "encoders": "engines/encoders.py",
}


def names(group: str, *ns: str) -> dict[str, str]:
    return {n: G[group] for n in ns}


OVERRIDES: dict[str, dict[str, str]] = {
    "answers.py": names("results", "Answer"),
    "batch.py": {
        **names("discover", "IMAGE_SUFFIXES", "discover", "_read_bytes"),
        **names("files", "_sha256", "_atomic_write"),
        **names(
            "journal", "Format", "JournalWarning", "ResultsInUseError", "ResultsWriteError", "ResultsPathError",
            "lock_results", "journal_path", "Journal", "read_journal", "read_records", "valid_records", "_encode",
            "check_not_in_use", "_open_append", "append_durably", "RecordWriter",
        ),
        **names(
            "records", "IDENTITY_FIELDS", "identity", "identity_of", "utc_now", "record_of", "absolute",
            "_TEXT_FIELDS", "_NUMBER_FIELDS", "_COUNT_FIELDS", "_FLAG_FIELDS", "_OBJECT_FIELDS", "_LIST_FIELDS",
            "_kind", "_number", "record_problem",
        ),
        **names("resume", "_text", "ImageIndex", "latest", "_short", "stale_notice", "ResumeState", "resume_state"),
        **names(
            "formats", "CSV_FIELDS", "_mapping", "_csv_value", "csv_row", "record_to_feature", "write_geojson",
            "write_csv", "write_output",
        ),
    },
    "bundle.py": {
        **names("files", "_CHUNK", "sha256_file", "_fsync"),
        **names(
            "parse", "_MISSING", "_Check", "_HEX64", "MAX_MANIFEST_BYTES", "_is_int", "_int", "_number", "_numbers",
            "_hex64", "_or_null", "_str_map", "_fp16", "_IMAGE_SIZE", "_DIM", "_MEAN", "_STD", "_GRID", "_FILES",
            "_PARAMS", "_shown", "_check_params", "_parse_files", "_parse_component", "_read_manifest",
            "_check_format_version",
        ),
        **names(
            "writer", "_listed_files", "_created_folders", "_inventory", "_unlink_owned", "remove_bundle",
            "check_target", "_LEFTOVER", "_lock", "_unlock", "_Locked", "_fsync_tree", "_discard_old",
            "_discard_aside", "_clean_leftovers", "BundleWriter",
        ),
    },
    "cli.py": {
        **names("plugins", "_PLUGIN_GROUP", "_plugin", "_LazyPluginGroup"),
        **names(
            "common", "_fail", "EXIT_SOME_FAILED", "DEMO_WARNING", "_warn", "_warn_if_demo", "_progress",
            "_engine_options", "_TRUSTED_KEY_HELP", "_check_trusted_keys", "_key_files", "_reason", "_same_file",
        ),
        **names(
            "c_bundle", "bundle", "bundle_info", "bundle_verify", "bundle_sign", "bundle_keygen", "bundle_demo",
            "bundle_synth",
        ),
        **names("c_locate", "locate", "_locate_on_ray"),
        **names("c_results", "_inputs_of", "_refuse_own_input", "_read_results", "export_records", "report_cmd"),
        **names("c_eval", "evaluate_cmd"),
        **names("c_audit", "audit", "_journal_of", "audit_verify", "audit_sign"),
        **names("c_inspect", "metadata_cmd"),
    },
    "cli_gallery.py": names("common", "EXIT_SOME_FAILED"),
    "cluemap.py": {**names("results", "Cue"), **names("encoders", "_unit")},
    "cluster/job.py": {
        **names("plan", "ActorPlan", "plan_actors", "_connect", "_quiet", "ACTOR_WAIT_S"),
        **names("actor", "_DONE_CACHE", "_path", "_done", "read_and_hash", "GeolocatorActor"),
        **names("files", "_manifest_sha256"),
    },
    "evaluate.py": names("distance", "distance_km"),
    "geocode.py": names("distance", "EARTH_RADIUS_KM", "unit_vectors", "haversine_km"),
    "geolocator.py": {
        **names(
            "options", "CONSTRAIN_CHOICES", "MAX_REFERENCES", "MAX_SAMPLES", "MAX_GENERATION_TOKENS", "_opt_bool",
            "_opt_int", "_opt_float", "_references", "_region", "_py", "Options", "_whole",
        ),
        **names("results", "Failure"),
        **names(
            "memory", "N_CTX_DEFAULT", "N_UBATCH", "GiB", "vlm_int", "_bundle_temperature", "MemoryNeed",
            "_gpu_offload_supported", "_memory_model", "memory_need", "available_memory", "_cgroup_room",
            "check_memory",
        ),
        **names("encoders", "device_providers"),
    },
    "metadata.py": {
        **names("tiff", "_TYPES", "_Entry", "_Tiff", "_text", "_rational_values"),
        **names(
            "exif", "_TAG_NAMES", "_GPS_NAMES", "_exif_coordinate", "_exif_altitude", "_gps_time",
            "_datetime_original", "_read_exif", "_OFFSET",
        ),
        **names("xmp", "_NS", "_XMP_COORD", "_xmp_coordinate", "_xmp_number", "_xmp_fields", "_read_xmp"),
        **names("containers", "_png_blocks", "_blocks"),
    },
    "reference_gallery.py": {
        **names("sources", "GalleryBuildError", "SourcePhoto", "Problem", "_coordinate", "read_csv_source",
                "read_source"),
        **names("build", "SAVE_EVERY_S", "POSITION_CONFLICT_KM", "BuildSummary", "_utc_now", "write_manifest",
                "_Writer", "_batches", "build_gallery", "_conflict"),
        **names("files", "_fsync"),
    },  # fmt: skip
    "report.py": {
        **names(
            "figures", "W, H", "THUMB_MAX", "OUTLINE_TOLERANCE_DEG", "LAND, OCEAN, BORDER", "CUE_COLORS",
            "METADATA_COLOR", "PREDICTION_COLOR", "_COLORS", "_xy", "patch_box", "world_path", "Thumbnail",
            "load_thumbnail", "_primaries", "_color", "_photo_svg", "_view", "_marks", "_map_svg", "_record_points",
            "_overview_points",
        ),
        **names(
            "style", "_CSP", "_STYLE", "_finite", "_items", "_mapping", "_kind", "_json_safe", "_json", "_e", "_num",
            "_km", "_code", "_rows", "_position",
        ),
        **names(
            "sections", "_cluemap_html", "_candidates_html", "_answers_html", "_metadata_html", "_raw_html",
            "_resolve", "_region_text", "_why", "_guarded", "_unshown", "_entry", "_problems_html", "_thumb_of",
            "_figure", "_summary", "_ok_section", "_failed_section",
        ),
        **names(
            "custody", "_custody_html", "_audit_line", "load_trusted_keys", "_signature_line", "_signature_lines"
        ),
    },
    "retrieval.py": {**names("coords", "HNSW_EXPANSION", "Gallery"), **names("files", "_file_digest")},
    "stages.py": names("selection", "Selection", "choose", "region_anchor", "nearest_source"),
}

NOTES: dict[tuple[str, str], str] = {
    ("answers.py", "Answer"): "breaks answers <-> results",
    ("attestation.py", "content_digest"): "renamed journal_digest",
    ("batch.py", "_read_bytes"): "public: read_input_bytes (cluster reads it)",
    ("batch.py", "_sha256"): "public: sha256_bytes (None-safe)",
    ("batch.py", "_atomic_write"): "the one atomic_write (fsync added)",
    ("batch.py", "_encode"): "public: encode_line (shards uses it)",
    ("batch.py", "_number"): "public: is_finite_number (formats uses it)",
    ("batch.py", "discover"): "breaks batch -> geolocator -> reference_gallery -> batch",
    ("batch.py", "run_batch"): "split (see long functions)",
    ("bundle.py", "FORMAT_VERSION"): "renamed BUNDLE_FORMAT_VERSION (value '1.0' kept)",
    ("bundle.py", "MANIFEST"): "renamed MANIFEST_FILE",
    ("bundle.py", "sha256_file"): "the file digest helper",
    ("bundle.py", "_fsync"): "public: fsync_path",
    ("bundle.py", "Bundle"): "open() split: parse / check / resolve paths",
    ("cli.py", "locate"): "flags generated from Options; body split",
    ("cli.py", "_engine_options"): "becomes load_flags (engine, in-flight, device, verify, trusted-key, gallery)",
    ("cluemap.py", "Cue"): "results: the record vocabulary",
    ("cluemap.py", "_unit"): "merged into unit_rows(x, dtype=np.float64)",
    ("cluster/job.py", "_run"): "split (see long functions)",
    ("cluster/job.py", "MANIFEST_SUFFIXES"): "renamed INPUT_LIST_SUFFIXES ('manifest' = bundle only)",
    ("cluster/job.py", "_manifest_sha256"): "replaced by files.sha256_file",
    ("encoders.py", "_normalize"): "public: unit_rows (the survivor of _unit/_normalize)",
    ("eval_run.py", "run_eval"): "split (see long functions)",
    ("geolocator.py", "_whole"): "public: whole_number",
    ("geolocator.py", "Failure"): "results: the record vocabulary",
    ("geolocator.py", "Geolocator"): "_locate body -> pipeline/run.py",
    ("image.py", "_heif_available"): "public: heif_available (metadata reads it)",
    ("reference_gallery.py", "FORMAT_VERSION"): "renamed GALLERY_FORMAT_VERSION (value 1 kept)",
    ("reference_gallery.py", "MANIFEST"): "renamed GALLERY_MANIFEST_FILE",
    ("reference_gallery.py", "content_digest"): "renamed gallery_rows_digest",
    ("reference_gallery.py", "_fsync"): "merged into files.fsync_path",
    ("reference_gallery.py", "PhotoGallery"): "implements the public Store hooks, no private overrides",
    ("report.py", "_open_bundle"): "removed: callers pass a Bundle or None",
    ("report.py", "_items"): "becomes Record.list_of (same TypeError text)",
    ("report.py", "_mapping"): "becomes Record.object_of (same TypeError text)",
    ("retrieval.py", "Gallery"): "renamed CoordinateGallery",
    ("retrieval.py", "SearchMixin"): "public hooks (Store protocol) instead of private overrides",
    ("retrieval.py", "_file_digest"): "public: quick_file_digest",
    ("selection.py", "select"): "renamed best_by_cosine",
    ("stages.py", "choose"): "selection is one module: Selection + choose",
    ("doctor.py", "doctor_cmd"): "the `clue2geo doctor` command",
}


def top_level(path: Path) -> list[tuple[str, int, int, str]]:
    tree = ast.parse(path.read_text())
    out = []
    for n in tree.body:
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
            start = min([d.lineno for d in n.decorator_list] + [n.lineno])
            out.append((n.name, start, n.end_lineno, "class" if isinstance(n, ast.ClassDef) else "def"))
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            tgt = n.targets[0] if isinstance(n, ast.Assign) else n.target
            name = ast.unparse(tgt).strip("()")
            if name in ("__all__",):
                continue
            out.append((name, n.lineno, n.end_lineno, "const"))
    return out


def header_lines(path: Path) -> int:
    """Docstring + imports: the lines before the first def/class/constant."""
    tree = ast.parse(path.read_text())
    for n in tree.body:
        if not isinstance(n, (ast.Import, ast.ImportFrom, ast.Expr, ast.Try, ast.If)):
            return n.lineno - 1
    return len(path.read_text().splitlines())


sizes: dict[str, int] = defaultdict(int)
origin: dict[str, set[str]] = defaultdict(set)
print("| current module (lines) | goes to | top-level names (lines) | notes |")
print("|---|---|---|---|")
files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
for rel in files:
    path = root / rel
    default = MOVES.get(rel, rel)
    n_lines = len(path.read_text().splitlines())
    head = header_lines(path)
    sizes[default] += head
    groups: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = defaultdict(list)
    for name, a, b, kind in top_level(path):
        dest = OVERRIDES.get(rel, {}).get(name, default)
        sizes[dest] += b - a + 2  # the name and its blank lines
        origin[dest].add(rel)
        groups.setdefault(dest, []).append(f"`{name}` {b - a + 1}" if b - a >= 4 else f"`{name}`")
        if (rel, name) in NOTES:
            notes[dest].append(f"`{name}`: {NOTES[(rel, name)]}")
    first = True
    for dest, items in groups.items():
        label = f"`{rel}` ({n_lines})" if first else "〃"
        first = False
        shown = "stays" if dest == rel else f"`{dest}`"
        print(f"| {label} | {shown} | {', '.join(items)} | {'; '.join(notes[dest])} |")
print()
# new modules get a header (docstring + imports) of ~25 lines; new code the plan adds:
ADDED = {
    "runs/records.py": ("Record (typed view, from_dict/to_dict, list_of/object_of)", 120),
    "pipeline/run.py": ("the body of Geolocator._locate as named phases", 170),
    "cli/common.py": ("flags generated from Options (options_flags) and load_flags", 70),
    "cli/__init__.py": ("main + add_command of each group", 10),
    "files.py": ("atomic_write, fsync_path, sha256_bytes, quick_file_digest", 45),
    "inputs/discover.py": ("sha256 of the bytes read (from batch)", 5),
}
for dest, (_, n) in ADDED.items():
    sizes[dest] += n
for dest in list(sizes):
    if dest not in MOVES.values() and dest not in {rel for rel in files}:
        sizes[dest] += 25
# methods that leave their class (the AST table is top-level only):
# LlamaBatchEngine's engine-thread loop (_run .. _fail, 254 lines) and its state types -> engines/batch_loop.py
sizes["engines/batched.py"] -= 254 + 13 + 62  # + _Image, _Ask, _flash, _fault
sizes["engines/batch_loop.py"] += 25 + 254 + 13 + 62
origin["engines/batch_loop.py"].add("engines/batched.py")
# what moves out of Geolocator itself: _locate's 128 lines (to pipeline/run.py)
sizes["geolocator.py"] -= 128 - 12
sizes["pipeline/run.py"] += 0
print("| new module | estimated lines | from |")
print("|---|---:|---|")
for dest in sorted(sizes):
    flag = " **over 450**" if sizes[dest] > 450 else ""
    print(f"| `{dest}` | {sizes[dest]}{flag} | {', '.join(sorted(origin[dest])) or 'new'} |")
