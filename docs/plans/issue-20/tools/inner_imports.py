"""List every import statement that is not a plain top-level statement (inside def/class/if/try)."""
import ast, sys, pathlib
root = pathlib.Path(sys.argv[1])
for p in sorted(root.rglob("*.py")):
    t = ast.parse(p.read_text())
    rel = p.relative_to(root.parent)
    def visit(node, ctx):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.Import, ast.ImportFrom)) and ctx:
                mod = ("." * getattr(ch, "level", 0)) + (getattr(ch, "module", None) or "") if isinstance(ch, ast.ImportFrom) else ""
                names = ", ".join(a.name for a in ch.names)
                what = f"from {mod} import {names}" if isinstance(ch, ast.ImportFrom) else f"import {names}"
                print(f"{rel}:{ch.lineno}\t{'/'.join(ctx)}\t{what}")
            nctx = ctx
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                nctx = ctx + [ch.name]
            elif isinstance(ch, ast.If):
                nctx = ctx + ["if " + ast.unparse(ch.test)[:30]]
            elif isinstance(ch, ast.Try):
                nctx = ctx + ["try"]
            visit(ch, nctx)
    visit(t, [])
