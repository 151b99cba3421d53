"""The package layout is the architecture: imports only go down the layers, and no module imports itself back.

Layers, top to bottom: the app (`mebt.cli`, `mebt.demo`) -> `launchers` -> `mebt.eval` -> `mebt.train` ->
`data_pipeline` -> `mebt.tokenizer` -> `mebt.core` -> the foundation (`mebt.config`, `mebt.errors`,
`mebt.fsutil`, `mebt.logs`, `mebt.media`, `mebt.safe_unpickle`). Every import is checked, including the ones inside
functions (a lazy import that runs up a layer is still an arrow the wrong way).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mebt", "data_pipeline", "launchers")
LAYERS = [   # (layer, module prefixes), bottom first
    ("foundation", ("mebt", "mebt.config", "mebt.errors", "mebt.fsutil", "mebt.logs", "mebt.media",
                    "mebt.safe_unpickle")),
    ("core", ("mebt.core",)),
    ("tokenizer", ("mebt.tokenizer",)),
    ("data", ("data_pipeline",)),
    ("train", ("mebt.train",)),
    ("eval", ("mebt.eval",)),
    ("launchers", ("launchers",)),
    ("app", ("mebt.cli", "mebt.demo", "mebt.bench")),
]


def layer_of(module: str) -> int:
    """Index of the layer whose most specific prefix matches ``module``."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: dict) -> list[tuple[str, int]]:
    """(imported project module, line) for every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import mod` imports pkg.mod when that is a module, else a name of pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        out += [(name, node.lineno) for name in names if name.split(".")[0] in PACKAGES]
    return out


GRAPH = {module: imports(path, modules()) for module, path in modules().items()}


def upward(graph: dict) -> list[str]:
    return [f"{module}:{line} imports {dep} ({LAYERS[layer_of(module)][0]} -> {LAYERS[layer_of(dep)][0]})"
            for module, deps in graph.items() for dep, line in deps if layer_of(dep) > layer_of(module)]


def circles(graph: dict) -> list[list[str]]:
    """Tarjan's strongly connected components: every component of two or more modules is a circle."""
    edges = {m: sorted({d for d, _ in deps if d in graph and d != m}) for m, deps in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer_and_imports_only_down():
    assert len(GRAPH) > 40 and "mebt.train.loop" in GRAPH and "launchers.slurm" in GRAPH
    assert not upward(GRAPH), "imports that run up a layer:\n" + "\n".join(upward(GRAPH))


def test_no_import_circles():
    assert not circles(GRAPH), f"import circles: {circles(GRAPH)}"


def test_the_checks_catch_upward_imports_and_circles(tmp_path):
    # A core module reaching up into the trainer, found inside a function body.
    source = tmp_path / "model.py"
    source.write_text("import torch\n\ndef f():\n    from mebt.train import loop\n    return loop\n")
    graph = {"mebt.core.model": imports(source, {"mebt.train.loop": None}), "mebt.train.loop": []}
    assert graph["mebt.core.model"] == [("mebt.train.loop", 4)]
    assert upward(graph) == ["mebt.core.model:4 imports mebt.train.loop (core -> train)"]
    assert circles({"a.x": [("a.y", 1)], "a.y": [("a.z", 1)], "a.z": [("a.x", 1)], "a.w": [("a.x", 1)]}) == [
        ["a.x", "a.y", "a.z"]]


def test_every_package_is_installed():
    """setup.cfg lists the packages (configs/ is mapped to mebt.configs): a new sub-package must be added there."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")}
    assert listed == found | {"mebt.configs"}
    assert (ROOT / "configs" / "__init__.py").is_file() and "mebt.configs = configs" in cfg["options"]["package_dir"]
