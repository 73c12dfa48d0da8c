"""The code part of a stage's fingerprint, derived from the source instead of a hand-bumped number.

A stage's code is its own module plus every library module it imports, directly or through other
library modules (found by reading the `import` statements, function-level ones included, without
importing anything), plus the modules of the recipes it runs (`Stage.recipes`: found by name at run
time, so no import statement names them). A unit's code is its function's module and its recipes'
modules alike: editing a plot or a headline reruns a stage but not its units where its unit function
lives outside the stage's module (ensemble members, cv folds, pseudo students, augment's passes,
precompute's shards: `pipeline/training`, `pipeline/models`). The engine, experiments, shipping and
cli folders and `pipeline.core` are the cache's own machinery and are left out: they decide when a
stage runs, not what it writes. Each file is hashed (sha256 of its syntax tree: a comment or a
re-wrapped line changes nothing); a real edit makes every stage that uses it stale, and `kp status`
names the file.
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
LIBRARY_PACKAGES = ("pipeline.data", "pipeline.models", "pipeline.training", "pipeline.evaluation",
                    "pipeline.kaggle")


def module_file(name: str) -> Path | None:
    """`pipeline.training.recipes.head` -> its .py file under the project (None if there is none)."""
    base = PROJECT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _counts(name: str) -> bool:
    return name.startswith("stages.") or any(name == p or name.startswith(p + ".") for p in LIBRARY_PACKAGES)


@lru_cache(maxsize=None)
def _file_facts(path: Path, mtime_ns: int, size: int) -> tuple[str, tuple[str, ...]]:
    """(sha256 of the file's syntax tree, the modules it imports); cached per file version. The tree holds
    what runs and not how it is written: a comment, a blank line or a line wrapped differently changes
    no hash (docstrings are in the tree, and count)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    imported: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.append(node.module)
            imported += [f"{node.module}.{alias.name}" for alias in node.names]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:12], tuple(imported)


def _facts(path: Path) -> tuple[str, tuple[str, ...]]:
    st = path.stat()
    return _file_facts(path, st.st_mtime_ns, st.st_size)


def code_hashes(*modules: str) -> dict[str, str]:
    """{project-relative file: hash} for `modules` and the library modules they reach.

    Args:
        modules: module names, e.g. `stages.finetune` and the recipe modules it runs.

    Returns:
        File hashes, sorted by path; the fingerprint hashes this dict.
    """
    seen: dict[str, str] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None:
            continue
        relative = str(path.relative_to(PROJECT))
        if relative in seen:
            continue
        digest, imported = _facts(path)
        seen[relative] = digest
        todo += [m for m in imported if _counts(m)]
    return dict(sorted(seen.items()))
