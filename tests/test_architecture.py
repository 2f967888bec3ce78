"""The package's import graph: no circle, and no module importing one above it in the data path of
DESIGN.md (data -> split -> partition -> samples -> backbone -> algorithm -> runtime -> evaluation
-> run folder), function-local imports included."""

import ast
from pathlib import Path

import fellrec

SRC = Path(fellrec.__file__).parent

# lowest first; a module may import its own layer and those before it
LAYERS = [
    ["errors", "files", "stats", "metrics", "mf"],
    ["config", "llm", "adapters", "data"],
    ["holdout"],
    ["partition", "fedpa.features"],
    ["pipeline"],
    ["strategies", "storage", "train", "evaluate", "backbones", "baselines", "fedpa.metrics",
     "fedpa.model", "fedpa.pretrain"],
    ["trainer", "fedpa.trainer", "fedpa"],
    ["runtime.checkpoint", "runtime.rounds", "runtime.embedded", "runtime"],
    ["results", "report", "rundir", "build", "fedpa.build"],
    ["runtime.flower.records", "runtime.flower.state", "runtime.flower.deploy", "runtime.flower"],
    ["runtime.flower.nodes"],
    ["runtime.flower.runtime"],
    ["runtime.flower.plain", "runtime.flower.fedpa"],
    ["runtime.flower.split"],
    ["runtime.flower.client", "runtime.flower.worker"],
    ["runtime.flower.app", "run", "cli", "__main__"],
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(name: str) -> int:
    """The layer of the longest prefix of ``name`` that LAYERS lists."""
    best, found = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    assert found is not None, f"fellrec.{name} is in no layer of tests/test_architecture.py"
    return found


def imports() -> dict[str, set[str]]:
    """fellrec module -> the fellrec modules it imports (anywhere in it)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(["fellrec", *up, *([base] if base else [])]).strip(".")
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if not t.startswith("fellrec."):
                    continue
                t = t.removeprefix("fellrec.")
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        out[name] = found
    return out


def test_no_module_imports_one_above_it():
    upward = [f"fellrec.{m} (layer {layer_of(m)}) imports fellrec.{d} (layer {layer_of(d)})"
              for m, deps in imports().items() if m for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert upward == []


def test_no_import_circle():
    graph = imports()
    seen, done, circles = set(), set(), []

    def visit(m, path):
        if m in done:
            return
        if m in seen:
            circles.append([*path[path.index(m):], m])
            return
        seen.add(m)
        for d in sorted(graph[m]):
            visit(d, [*path, m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])
    assert circles == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checks above can fail: a data-path module that imported the recipe would be caught."""
    assert layer_of("run") > layer_of("holdout") and layer_of("runtime.flower.split") > layer_of("runtime.rounds")
    assert "build" in imports()["run"] and "rundir" in imports()["runtime.flower.plain"]
