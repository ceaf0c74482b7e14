"""Functions (and methods) longer than N lines, from the AST: body lines (def to end), decorators counted apart."""
import ast, sys
from pathlib import Path
limit = int(sys.argv[1]); roots = sys.argv[2:]
rows = []
for r in roots:
    for p in sorted(Path(r).rglob("*.py")):
        t = ast.parse(p.read_text())
        def walk(node, prefix):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = ch.end_lineno - ch.lineno + 1
                    dec = ch.lineno - min([d.lineno for d in ch.decorator_list] + [ch.lineno])
                    if n > limit:
                        rows.append((n, dec, f"{p}:{ch.lineno}", prefix + ch.name))
                    walk(ch, prefix + ch.name + ".")
                elif isinstance(ch, ast.ClassDef):
                    walk(ch, prefix + ch.name + ".")
        walk(t, "")
for n, dec, where, name in sorted(rows, reverse=True):
    print(f"| {n} | {dec or ''} | `{where}` | `{name}` |")
