"""The code's shape: layered subpackages, one place for artifact names, stages offered only once they exist."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

from pipeline.core import artifacts
from pipeline.engine.registry import stage_names
from tests.helpers import REPO

# Lower layers never import higher ones; a package may import its own modules.
LAYERS = {"pipeline.core": 0, "pipeline.data": 1, "pipeline.models": 2, "pipeline.evaluation": 2,
          "pipeline.training": 3, "pipeline.kaggle": 3, "stages": 4, "pipeline.engine": 5,
          "pipeline.experiments": 6, "pipeline.shipping": 6, "pipeline.cli": 7, "pipeline": 8}


def _layer(module: str) -> tuple[str, int]:
    if module == "pipeline":  # the package's __init__, which importing any of its modules runs first
        return "pipeline.__init__", -1
    for package in sorted(LAYERS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package, LAYERS[package]
    raise AssertionError(f"{module} is in no layer")


def _modules() -> dict[str, Path]:
    files = [*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").glob("*.py")]
    return {".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m == "pipeline" or m.startswith(("pipeline.", "stages"))}


def test_no_module_imports_from_a_layer_above_it():
    problems = []
    for module, path in _modules().items():
        package, rank = _layer(module)
        for imported in _imports(path):
            other, other_rank = _layer(imported)
            if other != package and other_rank >= rank:
                problems.append(f"{module} ({package}) imports {imported} ({other})")
    assert not problems, "\n".join(problems)


def test_the_engine_is_the_only_code_that_imports_stages():
    users = {m for m, path in _modules().items() if any(i.startswith("stages") for i in _imports(path))}
    assert {_layer(m)[0] for m in users} <= {"pipeline.engine", "stages"}


def test_no_stage_module_imports_another():
    problems = [f"{module} imports {imported}" for module, path in _modules().items() if module.startswith("stages.")
                for imported in _imports(path) if imported.startswith("stages")]
    assert not problems, "a stage reaches another stage's code only through pipeline/:\n" + "\n".join(problems)


def test_no_code_compares_recipe_names_outside_the_registry():
    """Which recipe trains a model is decided by `pipeline.training.recipes.recipe(name)`, never by
    comparing a name (`source == "bnretrain"`)."""
    from pipeline.training.recipes import NAMES

    problems = []
    for module, path in _modules().items():
        if module.startswith("pipeline.training.recipes"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
                names = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(name in NAMES for name in names):
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno}: compares with {names}")
    assert not problems, "\n".join(problems)


def test_every_artifact_constant_is_assigned_once():
    """Read from the source: a name assigned twice keeps only its last value at run time, so checking
    the imported module alone cannot see it."""
    tree = ast.parse(Path(artifacts.__file__).read_text())
    assigned = [target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)]
    twice = sorted({name for name in assigned if assigned.count(name) > 1})
    assert not twice, f"pipeline/core/artifacts.py assigns {twice} more than once"
    values = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
    same = sorted({value for value in values if values.count(value) > 1})
    assert not same, f"pipeline/core/artifacts.py gives two names the same file name: {same}"


def test_every_artifact_name_is_spelled_once():
    names = {value for key, value in vars(artifacts).items() if key.isupper() and isinstance(value, str)
             and "." in value and not value.startswith(".")}
    problems = []
    for module, path in _modules().items():
        if module == "pipeline.core.artifacts":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                problems.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not problems, "spell these through pipeline.core.artifacts:\n" + "\n".join(problems)


def test_make_offers_exactly_the_stages_that_exist():
    database = subprocess.run(["make", "-pn", "-f", "Makefile", "--no-print-directory", "status"], cwd=REPO,
                              capture_output=True, text=True).stdout
    match = re.search(r"^STAGES := (.*)$", database, re.M)
    assert tuple(match.group(1).split()) == stage_names()


def test_both_configs_answer_to_the_one_config_face():
    """Library code annotates `config: ConfigReader`; the engine's ResolvedConfig and a stage's ConfigView
    each offer every member of it (checked on the classes: a view raises on an undeclared key by design)."""
    import dataclasses
    import typing

    from pipeline.core.config_reader import ConfigReader
    from pipeline.core.stage import ConfigView
    from pipeline.engine.config import ResolvedConfig

    members = {name for name in vars(ConfigReader) if not name.startswith("_")} | set(typing.get_type_hints(ConfigReader))
    fields = {f.name for f in dataclasses.fields(ResolvedConfig)}
    assert not [name for name in members if not hasattr(ResolvedConfig, name) and name not in fields]
    view_attributes = {"comp", "root"}  # set in ConfigView.__init__
    assert not [name for name in members if not hasattr(ConfigView, name) and name not in view_attributes]


def _all_imports(path: Path) -> set[str]:
    """Every pipeline or stages module `path` imports, function-level imports and `from X import module` included."""
    modules, found = _modules(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycle_among_the_modules():
    """No two modules of pipeline/ and stages/ import each other, directly or around a loop (a config that
    ran the runner made one: config -> runner -> status -> config)."""
    modules = _modules()
    graph = {module: _all_imports(path) - {module} for module, path in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_top_floor_of_pipeline_holds_no_purpose_of_its_own():
    """pipeline/ is folders by purpose (docs/layout.md); at most three modules stay loose on its top floor."""
    loose = sorted(p.name for p in (REPO / "pipeline").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(loose) <= 3, f"loose modules on pipeline/'s top floor: {loose}; give each a folder by purpose"


def test_every_config_parameter_is_typed():
    """A parameter named `config` says which face it takes: `ConfigReader` below the engine, `ResolvedConfig` above."""
    untyped = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                untyped += [f"{path.relative_to(REPO)}:{node.lineno}" for a in arguments
                            if a.arg == "config" and a.annotation is None]
    assert not untyped, "annotate these config parameters:\n" + "\n".join(untyped)
