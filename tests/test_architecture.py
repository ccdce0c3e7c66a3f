"""The import rule (docs/architecture.md): kernels <- io <- {synth, seg, diffusion} <-
{recipe, cli}; engine and viz sit beside io and import no model family; synth, seg and diffusion
never import each other; no two modules import each other, directly or in a longer circle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medfm"

# what each layer may import from medfm (besides itself); errors, devices, threads and workers
# are shared by all
BASE = {"medfm", "medfm.errors", "medfm.devices", "medfm.threads", "medfm.workers"}
ALLOWED = {
    "kernels": BASE,
    "io": BASE | {"kernels"},
    "engine": BASE | {"io", "kernels"},
    "viz": BASE | {"io", "kernels"},
    "synth": BASE | {"io", "kernels", "viz"},
    "seg": BASE | {"io", "kernels", "viz", "engine"},
    "diffusion": BASE | {"io", "kernels", "viz", "engine"},
    "recipe": BASE | {"io", "kernels", "viz", "engine", "synth", "seg", "diffusion"},
    "cli": BASE | {"io", "kernels", "viz", "engine", "synth", "seg", "diffusion", "recipe"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every medfm module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medfm")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("medfm"):
                found.add(node.module)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> str:
    parts = module.split(".")
    return module if len(parts) < 2 else parts[1]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    bad = []
    for module, imports in _graph().items():
        if _layer(module) != layer:
            continue
        for imp in imports:
            target = imp if imp in BASE else _layer(imp)
            if target != layer and target not in ALLOWED[layer] and imp not in BASE:
                bad.append(f"{module} imports {imp}")
    assert not bad, bad


def test_no_import_circles():
    graph = _graph()
    modules = set(graph)

    def resolve(name: str) -> str | None:  # "medfm.seg.train" or a name inside a module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {m: {t for i in imps if (t := resolve(i)) and t != m and t != "medfm"}
             for m, imps in graph.items()}  # fmt: skip
    # a package's __init__ re-exporting its modules is not a circle with them
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and t.count(".") == 1)}
             for m, ts in edges.items()}  # fmt: skip
    circles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                circles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not circles, circles
