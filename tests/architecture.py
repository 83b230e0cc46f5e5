"""The package's import graph, read from the source (AST), for tests/test_architecture.py."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cachebrew"


@dataclass(frozen=True)
class Import:
    module: str        # the importing module, e.g. cachebrew.recipes.distill.recipe
    target: str        # the module imported from, e.g. cachebrew.components.loader
    name: str | None   # the name imported (from x import name), None for `import x`
    line: int
    local: bool        # inside a function (runs later, but is still a dependency)


def module_name(path: Path, base: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(paths=None, root: Path = PACKAGE.parent) -> list[Import]:
    """The imports of cachebrew names in `paths` (default: the package's own files), modules named from `root`."""
    found = []
    for path in sorted(paths if paths is not None else PACKAGE.rglob("*.py")):
        module = module_name(path, root)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "cachebrew":
                    continue
                for alias in node.names:
                    found.append(Import(module, target, alias.name, node.lineno, id(node) in local_nodes))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "cachebrew":
                        found.append(Import(module, alias.name, None, node.lineno, id(node) in local_nodes))
    return found


def modules() -> set[str]:
    return {module_name(p) for p in PACKAGE.rglob("*.py")}


def resolve(imp: Import, known: set[str]) -> str:
    """`from pkg import submodule` depends on the submodule; `from pkg import name` on pkg."""
    if imp.name and f"{imp.target}.{imp.name}" in known:
        return f"{imp.target}.{imp.name}"
    return imp.target


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def exported_names(module: str) -> set[str] | None:
    """The literal `__all__` of a cachebrew module or package, None when it has none."""
    rel = Path(*module.split("."))
    path = PACKAGE.parent / rel / "__init__.py"
    path = path if path.exists() else (PACKAGE.parent / rel).with_suffix(".py")
    if not path.exists():
        return None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return None
