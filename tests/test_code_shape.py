"""The package's shape, checked from its source: layered imports without cycles, and small signatures.

Layers, lowest first: the shared base (argument checks, the launch switch, the op registry, the result
types, the dead-latent loss options), ``primitives`` (the kernels), ``ops`` (the registered ops),
``modules`` (the ``nn.Module``s), and what is built on modules (hub layers, the sharded module, the
architecture registry, the loaders of other packages' files, the CUDA-graph helper, the test oracles),
then the hooks that attach registered modules to a model. A file imports only from its own layer or lower ones.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "torch-ext" / "flash_sae"
LAYERS = (
    ("_launch", "_registry", "_validation", "results", "dead_latent_loss", "crosscoder_layers"),
    ("primitives",),
    ("ops",),
    ("modules",),
    (
        "layers",
        "distributed",
        "optim",
        "graph_training_step",
        "architectures",
        "loading",
        "testing",
        "latent_analysis",
        "latent_analysis_html",
    ),
    ("hooks",),
)
MAX_PARAMETERS = 10
TRITON_DECORATORS = ("jit", "autotune", "heuristics")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """The package modules ``name`` imports (relative imports; the package never imports itself absolutely)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in modules else target)
    return {m for m in found if m in modules and m != name}


def layer_of(name: str) -> int:
    top = name.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    return len(LAYERS)  # the package's __init__: above everything


def test_every_module_has_a_layer():
    unplaced = [n for n in package_modules() if n and layer_of(n) == len(LAYERS)]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_imports_go_down_the_layers():
    modules = package_modules()
    upward = [
        f"{name} -> {target}"
        for name, path in modules.items()
        for target in imports_of(name, path, modules)
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, f"imports from a lower layer to a higher one: {upward}"


def test_import_graph_has_no_cycles():
    modules = package_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt] if nxt in stack else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def is_triton_kernel(node) -> bool:
    for d in node.decorator_list:
        target = d.func if isinstance(d, ast.Call) else d
        if isinstance(target, ast.Attribute) and target.attr in TRITON_DECORATORS:
            return True
    return False


def wide_functions(folder: Path) -> list[str]:
    wide = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not is_triton_kernel(node):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) > MAX_PARAMETERS:
                    wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({len(names)})")
    return wide


@pytest.mark.parametrize("folder", ["torch-ext", "tests", "benchmarks", "examples"])
def test_no_function_takes_more_than_ten_parameters(folder):
    """Outside ``@triton.jit`` kernels (whose constexpr flags are how kernels share code), no function has
    more than ten parameters (self and cls not counted): many related values travel as one named object."""
    wide = wide_functions(ROOT / folder)
    assert not wide, f"functions with more than {MAX_PARAMETERS} parameters: {wide}"
