#!/usr/bin/env python3
"""Issue 20, the mechanical part: move whole modules of clue2geo_sdk into subpackages and rewrite
every reference to them. Run at the root of a checkout (a clean git work tree):

    python move.py            # do it
    python move.py --dry-run  # print what it would move and rewrite, change nothing

What it does, in order:

1. Refuses unless it is at a clue2geo root that has not been moved yet (clue2geo_sdk/batch.py exists,
   clue2geo_sdk/runs/ does not) and the tree is clean (so `git diff` shows exactly the move).
2. Rewrites, in memory, every file that may name a module:
   * relative imports inside clue2geo_sdk, recomputed from each file's new place (``from .bundle
     import Bundle`` in cli.py becomes ``from ..bundle.manifest import Bundle`` in cli/__init__.py);
     ``from . import stages`` becomes ``from .pipeline import stages`` (``as`` added when the leaf
     name changes);
   * ``from clue2geo_sdk import <module>`` (a moved module imported as a name);
   * every dotted reference ``clue2geo_sdk.<old module>[.attr...]`` anywhere in the text: absolute
     imports, monkeypatch targets ("clue2geo_sdk.batch.os.write"), ``:mod:``/``:func:`` roles,
     comments, pyproject (entry points, comments), README and docs;
   * every path reference ``clue2geo_sdk/<old module>.py`` (ruff per-file-ignores, docs).
   Files: clue2geo_sdk/, exporters/, training/, tests/, bench/, examples/ (*.py), pyproject.toml,
   README.md, docs/*.md. CHANGELOG.md is history and is left as written.
3. ``git mv`` each moved file, writes the rewritten texts, creates each new package's
   ``__init__.py`` (a docstring saying what it owns) and ``cli/__main__.py``.
4. ``ruff check --fix --select I`` (import order) and ``ruff format`` on the touched Python files.
5. Reports any reference to an old module it could not rewrite (none expected), and the bare
   file names (``batch.py``) left in docs for a human to read.

Splitting modules (content moving between files) is not done here: see plan.md, "Manual steps".
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

PKG = "clue2geo_sdk"

# old path (relative to clue2geo_sdk/) -> new path. Each file goes where its principal content lives
# after the manual splits; what it also holds today is extracted from there (plan.md).
MOVES: dict[str, str] = {
    # geo/: distance, countries, region, reverse geocoding
    "countries.py": "geo/countries.py",
    "region.py": "geo/region.py",
    "geocode.py": "geo/reverse.py",  # haversine_km & co. are split out to geo/distance.py (manual)
    # bundle/: manifest (open, verify, write), signing
    "bundle.py": "bundle/manifest.py",  # BundleWriter & friends split out to bundle/writer.py (manual)
    "signing.py": "bundle/signing.py",
    # inputs/: discover, image, metadata
    "image.py": "inputs/image.py",
    "metadata.py": "inputs/metadata/photo.py",  # tiff/exif/xmp/containers split out (manual)
    # engines/: base, batched, chat, grammar, ask, image_tokens, encoders (+ gguf_header, memory)
    "vlm.py": "engines/ask.py",
    "encoders.py": "engines/encoders.py",
    "image_tokens.py": "engines/image_tokens.py",
    "gguf_header.py": "engines/gguf_header.py",
    # retrieval/: search, coordinates, photos, photo_build, sources
    "retrieval.py": "retrieval/search.py",  # Gallery split out to retrieval/coordinates.py (manual)
    "reference_gallery.py": "retrieval/photos.py",  # sources / photo_build split out (manual)
    # pipeline/: run, stages, cluemap, parsing, prompts, selection, answers
    "stages.py": "pipeline/stages.py",
    "cluemap.py": "pipeline/cluemap.py",
    "parsing.py": "pipeline/parsing.py",
    "prompts.py": "pipeline/prompts.py",
    "selection.py": "pipeline/selection.py",
    "answers.py": "pipeline/answers.py",
    # runs/: batch, records, journal, formats, chain
    "batch.py": "runs/batch.py",  # records / journal / formats split out (manual)
    "audit.py": "runs/chain.py",
    # evidence/: attestation, report/
    "attestation.py": "evidence/attestation.py",
    "report.py": "evidence/report/render.py",  # sections / figures / custody / style split out (manual)
    # evaluation/: metrics, run, calibration
    "evaluate.py": "evaluation/metrics.py",
    "eval_run.py": "evaluation/run.py",
    "calibration.py": "evaluation/calibration.py",
    # cli/: one module per command group
    "cli.py": "cli/__init__.py",  # keeps `clue2geo_sdk.cli:main`; groups split out (manual)
    "cli_gallery.py": "cli/gallery.py",
    "doctor.py": "cli/doctor.py",
}

# New packages and what each owns (their __init__ docstrings; cli/ gets cli.py itself).
PACKAGES: dict[str, str] = {
    "geo": "Geography: great-circle distance, Natural Earth countries, regions, offline reverse geocoding.",
    "bundle": "The bundle on disk: its manifest (open, verify, write) and its Ed25519 signatures.",
    "inputs": "What comes in: paths discovered into files and bytes, images decoded safely, their metadata.",
    "inputs/metadata": "A photo's own metadata: TIFF/EXIF, XMP and the containers that hold them.",
    "retrieval": "Reference search: the shared search, the coordinate gallery, photo galleries and their build.",
    "pipeline": "The Clue2Geo pipeline for one image: its phases, stages, cluemap, prompts, parsing, selection.",
    "runs": "Batch runs: the run loop, the record and its identity, the journal, exports, the hash chain.",
    "evidence": "What an examiner checks: journal signatures (attestation) and the HTML case report.",
    "evidence/report": "The case report: one offline HTML file (render, sections, figures, custody, style).",
    "evaluation": "Evaluation: metrics, the evaluation run and confidence calibration.",
}

# Exact fix-ups after the rewrite: (new path, old text, new text). Each must match exactly once.
FIXUPS: list[tuple[str, str, str]] = [
    # `from .gallery import gallery` inside the cli package would rebind the package attribute
    # `clue2geo_sdk.cli.gallery` from the module to the click group, breaking getattr-based lookups
    # (monkeypatch / mock.patch strings). Import the module under a private name instead.
    (
        "cli/__init__.py",
        "from .gallery import gallery  # noqa: E402\n\nmain.add_command(gallery)\n",
        "from . import gallery as _gallery  # noqa: E402\n\nmain.add_command(_gallery.gallery)\n",
    ),
]

CLI_MAIN = '"""``python -m clue2geo_sdk.cli``: the ``clue2geo`` command."""\n\nfrom . import main\n\nmain()\n'

TEXT_GLOBS = ("pyproject.toml", "README.md", "docs/**/*.md")
PY_ROOTS = (PKG, "exporters", "training", "tests", "bench", "examples")


def modname(rel: str) -> str:
    """Module name of a path relative to clue2geo_sdk/ ("cli/__init__.py" -> "clue2geo_sdk.cli")."""
    parts = [PKG, *Path(rel).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULE_MAP = {modname(old): modname(new) for old, new in MOVES.items() if modname(old) != modname(new)}
PATH_MAP = {f"{PKG}/{old}": f"{PKG}/{new}" for old, new in MOVES.items()}
OLD_MODULES = {modname(p.relative_to(PKG).as_posix()) for p in Path(PKG).rglob("*.py")} if Path(PKG).is_dir() else set()


def map_module(name: str) -> str:
    """A dotted name with its longest moved-module prefix replaced (attributes after it kept)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in MODULE_MAP:
            return ".".join([MODULE_MAP[head], *parts[n:]])
    return name


def relative(from_pkg: str, target: str) -> str:
    """The relative module spec for ``target`` as seen from package ``from_pkg``."""
    a, b = from_pkg.split("."), target.split(".")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common == 0:
        raise ValueError(f"{target} is outside {from_pkg}")
    return "." * (len(a) - common + 1) + ".".join(b[common:])


class Manual(Exception):
    """An import this script cannot rewrite safely: named for a human."""


DOTTED = re.compile(r"(?<![\w.])" + PKG + r"(?:\.[A-Za-z_]\w*)+")
PATHS = re.compile(r"(?<![\w/])" + PKG + r"/[\w/]+\.py\b")
FROM_SPEC = re.compile(r"from(\s+)(\.+[\w.]*|[A-Za-z_][\w.]*)(\s+)import\b")


def _line_offsets(text: str) -> list[int]:
    offs, pos = [0], 0
    for line in text.splitlines(keepends=True):
        pos += len(line)
        offs.append(pos)
    return offs


def _names_text(node: ast.ImportFrom, mapping: dict[str, tuple[str, str | None]]) -> str:
    return ", ".join(
        f"{mapping[a.name][0]} as {a.asname or mapping[a.name][1]}"
        if (a.asname or mapping[a.name][1]) and (a.asname or mapping[a.name][1]) != mapping[a.name][0]
        else mapping[a.name][0]
        for a in node.names
    )


def rewrite_imports(text: str, old_rel: str | None, new_rel: str | None, where: str) -> str:
    """Rewrite the import statements of one Python file (``old_rel``/``new_rel``: its place under
    clue2geo_sdk/ before and after, or None for a file outside the package)."""
    tree = ast.parse(text)
    offs = _line_offsets(text)
    edits: list[tuple[int, int, str]] = []
    if old_rel is not None:
        old_mod, new_mod = modname(old_rel), modname(new_rel or old_rel)
        old_pkg = old_mod if old_rel.endswith("__init__.py") else old_mod.rsplit(".", 1)[0]
        new_pkg = new_mod if (new_rel or old_rel).endswith("__init__.py") else new_mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            if old_rel is None:
                continue
            base = old_pkg.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        elif node.module == PKG or (node.module and node.module.startswith(PKG + ".")):
            # Absolute imports were rewritten with the text already (rewrite_text runs first); only
            # a moved module imported as a name (`from clue2geo_sdk import retrieval`) is left here.
            target = node.module
        else:
            continue
        modules = {a.name for a in node.names if f"{target}.{a.name}" in OLD_MODULES}
        if all(map_module(f"{target}.{m}") == f"{target}.{m}" for m in modules):
            modules = set()  # no module named here moves: only the spec may change (relative imports)
        if modules and len(modules) != len(node.names):
            raise Manual(f"{where}:{node.lineno}: imports modules and names from {target} in one statement")
        start = offs[node.lineno - 1] + node.col_offset
        end = offs[node.end_lineno - 1] + node.end_col_offset
        stmt = text[start:end]
        if modules:  # from PKG import module[, module]: the parent may change, and the leaf name
            news = {a.name: map_module(f"{target}.{a.name}") for a in node.names}
            parents = {n.rsplit(".", 1)[0] for n in news.values()}
            if len(parents) != 1:
                raise Manual(f"{where}:{node.lineno}: modules imported together now live in {sorted(parents)}")
            else:
                parent = parents.pop()
            mapping = {a.name: (news[a.name].rsplit(".", 1)[1], a.name) for a in node.names}
            spec = relative(new_pkg, parent) if node.level else parent
            new_stmt = f"from {spec} import {_names_text(node, mapping)}"
            if "\n" in stmt or "#" in stmt:
                raise Manual(f"{where}:{node.lineno}: multi-line module import {stmt!r}")
            edits.append((start, end, new_stmt))
            continue
        if not node.level:
            continue
        spec = relative(new_pkg, map_module(target))
        m = FROM_SPEC.match(stmt)
        if m is None:
            raise Manual(f"{where}:{node.lineno}: cannot find the module spec in {stmt[:60]!r}")
        if m.group(2) != spec:
            edits.append((start + m.start(2), start + m.end(2), spec))
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return text


def rewrite_text(text: str) -> str:
    """Dotted module references and clue2geo_sdk/ file paths, anywhere in the text."""
    text = DOTTED.sub(lambda m: map_module(m.group(0)), text)
    return PATHS.sub(lambda m: PATH_MAP.get(m.group(0), m.group(0)), text)


def unresolved(root: Path, name: str) -> str | None:
    """Why a dotted clue2geo_sdk name cannot be right in the moved tree, or None. Its longest prefix that
    is a module or package on disk is found; a name through a new package (whose ``__init__`` holds
    only a docstring) or through the top package to a module that is gone is wrong."""
    parts = name.split(".")
    n = len(parts)
    while n > 1:
        base = root.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            break
        n -= 1
    prefix, rest = ".".join(parts[:n]), parts[n:]
    if not rest:
        return None
    rel = "/".join(parts[1:n])
    if rel in PACKAGES:
        return f"{prefix} is a new package: {rest[0]} is in one of its modules"
    if n == 1 and f"{PKG}.{rest[0]}" in MODULE_MAP:
        return f"{PKG}.{rest[0]} has moved"
    return None


def files_to_rewrite(root: Path) -> list[Path]:
    out: list[Path] = []
    for top in PY_ROOTS:
        if (root / top).is_dir():
            out += sorted(p for p in (root / top).rglob("*.py") if "__pycache__" not in p.parts)
    for pattern in TEXT_GLOBS:
        out += sorted(root.glob(pattern))
    return out


def run(cmd: list[str], dry: bool) -> None:
    print("  $", " ".join(cmd))
    if not dry:
        subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the moves and the files rewritten; change nothing")
    ap.add_argument("--allow-dirty", action="store_true", help="do not require a clean git work tree")
    args = ap.parse_args()
    root = Path.cwd()
    pkg = root / PKG
    if not (root / "pyproject.toml").is_file() or not pkg.is_dir():
        sys.exit(f"run this at the root of a clue2geo checkout (no pyproject.toml / {PKG}/ in {root})")
    if not (pkg / "batch.py").is_file() or (pkg / "runs").exists():
        sys.exit(f"{PKG} looks moved already ({PKG}/batch.py missing or {PKG}/runs/ present): nothing to do")
    missing = [old for old in MOVES if not (pkg / old).is_file()]
    if missing:
        sys.exit(f"modules this script moves are missing: {', '.join(missing)} (the tree changed: update MOVES)")
    unmapped = sorted(
        p.relative_to(pkg).as_posix()
        for p in pkg.glob("*.py")
        if p.name not in MOVES and p.name not in {"__init__.py", "_native.py", "_version.py", "errors.py",
                                                  "files.py", "sanitize.py", "results.py", "geolocator.py"}
    )  # fmt: skip
    if unmapped:
        sys.exit(f"top-level modules with no place in the new tree: {', '.join(unmapped)} (add them to MOVES)")
    status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    if status.strip() and not args.allow_dirty and not args.dry_run:
        sys.exit("the git work tree is not clean; commit or stash first (or pass --allow-dirty)")

    # 1. every rewrite, in memory, keyed by the file's NEW path
    new_texts: dict[Path, str] = {}
    problems: list[str] = []
    for path in files_to_rewrite(root):
        rel_repo = path.relative_to(root).as_posix()
        old_rel = path.relative_to(pkg).as_posix() if path.is_relative_to(pkg) else None
        new_rel = MOVES.get(old_rel, old_rel) if old_rel is not None else None
        text = path.read_text(encoding="utf-8")
        new = rewrite_text(text)  # first: absolute names, then the statements the text cannot fix
        if path.suffix == ".py":
            try:
                new = rewrite_imports(new, old_rel, new_rel, rel_repo)
            except Manual as exc:
                problems.append(str(exc))
        dest = pkg / new_rel if new_rel is not None else path
        if new != text or dest != path:
            new_texts[dest] = new
    for rel, old, new in FIXUPS:
        dest = pkg / rel
        text = new_texts.get(dest)
        if text is None or text.count(old) != 1:
            problems.append(f"fix-up for {rel} did not match exactly once: {old.splitlines()[0]!r}")
            continue
        new_texts[dest] = text.replace(old, new)
    if problems:
        print("cannot rewrite safely (fix by hand, then run again):", *problems, sep="\n  ")
        return 2

    # 2. the moves
    print(f"moving {len(MOVES)} modules:")
    for old, new in MOVES.items():
        print(f"  {PKG}/{old} -> {PKG}/{new}")
    print(f"rewriting {len(new_texts)} files:")
    for dest in sorted(new_texts):
        print(f"  {dest.relative_to(root)}")
    if args.dry_run:
        return 0
    for rel in PACKAGES:
        (pkg / rel).mkdir(parents=True, exist_ok=True)
    (pkg / "cli").mkdir(exist_ok=True)
    for old, new in MOVES.items():
        run(["git", "mv", f"{PKG}/{old}", f"{PKG}/{new}"], False)
    created = []
    for rel, doc in PACKAGES.items():
        init = pkg / rel / "__init__.py"
        init.write_text(f'"""{doc}"""\n', encoding="utf-8")
        created.append(init)
    main_py = pkg / "cli" / "__main__.py"
    main_py.write_text(CLI_MAIN, encoding="utf-8")
    created.append(main_py)
    for dest, text in new_texts.items():
        dest.write_text(text, encoding="utf-8")
    run(["git", "add", *(str(p.relative_to(root)) for p in created)], False)

    # 3. import order and line length of what was touched
    touched = sorted({str(p.relative_to(root)) for p in [*new_texts, *created] if p.suffix == ".py"})
    ruff = shutil.which("ruff")
    if ruff is None:
        print("ruff not found: run `ruff check --fix --select I` and `ruff format` on the touched files yourself")
    else:
        run([ruff, "check", "--fix", "--select", "I", "--quiet", *touched], False)
        run([ruff, "format", "--quiet", *touched], False)

    # 4. what is left for a human
    left = []
    for path in files_to_rewrite(root):
        text = path.read_text(encoding="utf-8")
        for m in DOTTED.finditer(text):
            why = unresolved(root, m.group(0))
            if why:
                left.append(f"{path.relative_to(root)}: {m.group(0)} ({why})")
    if left:
        print("references to old modules left (unexpected):", *left, sep="\n  ")
        return 1
    bare = re.compile(r"(?<![\w/.])(" + "|".join(re.escape(Path(o).name) for o in MOVES if o != "cli.py") + r")\b")
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    notes = [
        f"{d.relative_to(root)}:{n}: {m.group(0)}"
        for d in docs
        if d.is_file()
        for n, line in enumerate(d.read_text(encoding="utf-8").splitlines(), 1)
        for m in bare.finditer(line)
    ]
    if notes:
        print(
            f"{len(notes)} bare file names of moved modules in the docs (read them; rewrite if they mean the module):"
        )
        print(*notes[:40], sep="\n  ")
    print("done: check with `git status`, `ruff check .`, `lint-imports` and the tests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
