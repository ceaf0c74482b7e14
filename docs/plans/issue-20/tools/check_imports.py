"""Static check: every import of clue2geo_sdk (top-level or inside functions, in any .py under the given
roots) names a module that exists and names that module defines (or a submodule). Also dotted
"clue2geo_sdk.x.y" strings (monkeypatch targets) resolve to a module + attribute chain start."""
import ast, re, sys
from pathlib import Path
repo = Path(sys.argv[1]); roots = sys.argv[2:]
PKG = "clue2geo_sdk"
def mod_path(name):
    p = repo.joinpath(*name.split("."))
    if p.with_suffix(".py").is_file(): return p.with_suffix(".py")
    if (p / "__init__.py").is_file(): return p / "__init__.py"
    return None
_defs = {}
def defined(path):
    if path not in _defs:
        t = ast.parse(path.read_text()); names = set()
        for n in ast.walk(t) if False else t.body:
            for m in ([n] + (list(ast.walk(n)) if isinstance(n, (ast.If, ast.Try)) else [])):
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)): names.add(m.name)
                elif isinstance(m, ast.Assign):
                    for tg in m.targets:
                        for x in ast.walk(tg):
                            if isinstance(x, ast.Name): names.add(x.id)
                elif isinstance(m, ast.AnnAssign) and isinstance(m.target, ast.Name): names.add(m.target.id)
                elif isinstance(m, (ast.Import, ast.ImportFrom)):
                    for a in m.names: names.add((a.asname or a.name).split(".")[0])
        _defs[path] = names
    return _defs[path]
bad = 0; n_imports = 0
for r in roots:
    for f in sorted((repo / r).rglob("*.py")):
        rel = f.relative_to(repo)
        t = ast.parse(f.read_text())
        parts = list(rel.with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg: parts = parts[:-1]
        for node in ast.walk(t):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = parts if is_pkg else parts[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if not mod.startswith(PKG): continue
                n_imports += 1
                mp = mod_path(mod)
                if mp is None:
                    print(f"{rel}:{node.lineno}: no module {mod}"); bad += 1; continue
                for a in node.names:
                    if a.name == "*": continue
                    if mod_path(f"{mod}.{a.name}") is None and a.name not in defined(mp):
                        print(f"{rel}:{node.lineno}: {mod} defines no {a.name}"); bad += 1
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith(PKG):
                        n_imports += 1
                        if mod_path(a.name) is None:
                            print(f"{rel}:{node.lineno}: no module {a.name}"); bad += 1
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(PKG + r"(\.\w+)+", node.value):
                p = node.value.split(".")
                for n in range(len(p), 0, -1):
                    mp = mod_path(".".join(p[:n]))
                    if mp: break
                if n < len(p) and p[n] not in defined(mp) and mod_path(".".join(p[: n + 1])) is None:
                    print(f"{rel}:{node.lineno}: string {node.value!r}: {'.'.join(p[:n])} defines no {p[n]}"); bad += 1
print(f"{n_imports} imports of {PKG} checked, {bad} broken")
sys.exit(1 if bad else 0)
