"""The import graph follows the pipeline: leaf modules first, then the pass (``core``) stage
by stage, then ``accuracy`` and ``deploy`` side by side (neither imports the other), then the
``front``. Function-local imports count too."""

import ast
import subprocess
import sys
from pathlib import Path

import structprune

PACKAGE = Path(structprune.__file__).parent

# each module may import only modules of its own rank or lower; leaves import nothing of
# structprune
ORDER = [
    ["errors", "types", "tree", "files"],
    ["batches", "config"],  # leaves but for the errors they raise
    ["core", "core.registry"],
    ["core.rules", "core.rules.base", "core.rules.aten", "core.rules.elementwise",
     "core.rules.layers", "core.rules.reduce", "core.rules.shape", "core.rules.zoo",
     "core.rules.onnx2torch"],
    ["core.capture"], ["core.analyse"], ["core.criteria"], ["core.obs"], ["core.score"],
    ["core.plan"],
    ["core.cost"], ["core.selection"], ["core.apply"], ["core.literals"], ["core.prepare"],
    ["core.verify"], ["core.counts"], ["core.api"],
    ["accuracy", "accuracy.distributed", "deploy"],
    ["accuracy.data", "accuracy.evaluate", "accuracy.train", "accuracy.sparsity",
     "deploy.export", "deploy.bench"],
    ["accuracy.recover", "deploy.runtimes", "deploy.quantize"], ["accuracy.sensitivity"],
    ["deploy.latency"], ["deploy.widths"], ["deploy.tune"], ["deploy.speed"],
    ["front", "front.models", "front.onnx_in", "front.plots", "front.quantize"], ["front.io"],
    ["front.runs"],
    ["front.workflow", "front.demo", "front.yolo"],
    ["front.cli.arguments", "front.cli.output"],
    ["front.cli.prune", "front.cli.analyze", "front.cli.bench", "front.cli.eval",
     "front.cli.demo", "front.cli.train", "front.cli.finetune", "front.cli.quantize"],
    ["front.cli.sweep"], ["front.cli"],
    ["__main__"],
]
RANK = {name: rank for rank, names in enumerate(ORDER) for name in names}
LEAVES = set(ORDER[0])
# packages that never import each other, in either direction
APART = [("accuracy", "deploy")]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """structprune modules ``name`` imports anywhere in its file (relative and absolute)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("structprune"):
                target = node.module.removeprefix("structprune").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import bench` names a module
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in known else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("structprune."):
                    found.add(alias.name.removeprefix("structprune."))
    return {m for m in found if m in known and m != name}


def test_every_module_has_a_place_in_the_pipeline():
    assert set(_modules()) == set(RANK)


def test_imports_follow_the_pipeline_without_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    for name, imported in graph.items():
        if name in LEAVES:
            assert not imported, f"{name} is a leaf but imports {imported}"
        for other in imported:
            if name.startswith("core.rules") and other.startswith("core.rules"):
                continue  # the declarations package and its parts
            assert RANK[other] <= RANK[name], f"{name} imports the later stage {other}"
            for a, b in APART:
                for x, y in ((a, b), (b, a)):
                    assert not (_within(name, x) and _within(other, y)), \
                        f"{name} ({x}) imports {other} ({y})"
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        assert state.get(name) != 1, f"import cycle: {' -> '.join(path + [name])}"
        state[name] = 1
        for other in sorted(graph[name]):
            if not (name == "core.rules" and other.startswith("core.rules.")):
                visit(other, path + [name])
        state[name] = 2

    for name in sorted(graph):
        visit(name, [])


def _runs_cleanly(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing of structprune imported yet)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_each_module_imports_on_its_own():
    modules = sorted(_modules())
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('structprune')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module('structprune.' + name)\n"
    )
    _runs_cleanly(code)


def test_headline_names_are_the_features_not_submodules():
    """Every exported name resolves to the feature itself, even after each submodule has been
    imported (importing ``structprune.x`` sets the attribute ``x`` on the package, which would
    replace a function of the same name)."""
    code = (
        "import importlib, types, structprune as sp\n"
        f"for name in {sorted(_modules())!r}:\n"
        "    importlib.import_module('structprune.' + name)\n"
        "for name in sp.__all__:\n"
        "    value = getattr(sp, name)\n"
        "    assert not isinstance(value, types.ModuleType), name\n"
        "assert callable(sp.recover) and callable(sp.prune_for_target)\n"
        "assert callable(sp.export_onnx) and callable(sp.prune_to_dir)\n"
    )
    _runs_cleanly(code)
