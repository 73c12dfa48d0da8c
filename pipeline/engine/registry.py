"""Finds the stages: every module in the `stages` package that defines `STAGE` (named as its module).

Adding a stage is one new module in `stages/` plus its section in `configs/defaults.yaml`; nothing
here changes. The order stages run in is derived from what each needs (`in_run_order`, a
topological sort as DVC and Kedro do), never kept in a list. `stage_names` and `stage_summary` read the package's files without importing them,
so `kp --help` lists the stages without pydantic or any stage code; `all_stages` imports them.
Stage modules must import only light modules at top level (no TensorFlow, no pandas), because
`kp status` imports them all.
"""
from __future__ import annotations

import ast
import importlib
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.core.stage import Stage

STAGES_DIR = Path(__file__).resolve().parents[2] / "stages"


def in_run_order(names, needs) -> list[str]:
    """`names` sorted so that every stage comes after the stages it needs (Kahn's algorithm); among
    stages ready at the same time, alphabetically: the order never depends on how they were listed.

    Args:
        names: the stages to order.
        needs: `needs(name)` -> the stages `name` reads; those outside `names` are ignored.

    Returns:
        The order to run them in; a cycle raises RuntimeError naming it.
    """
    names = sorted(names)
    waiting = {name: [n for n in needs(name) if n in names] for name in names}
    order: list[str] = []
    while waiting:
        ready = [name for name in names if name in waiting and all(n in order for n in waiting[name])]
        if not ready:
            raise RuntimeError(f"stage dependency cycle among {sorted(waiting)}")
        order.append(ready[0])
        del waiting[ready[0]]
    return order


def with_needs(targets, needs) -> list[str]:
    """`targets` and every stage they need, transitively, each once, in the order found (depth first).

    Args:
        targets: the stages asked for.
        needs: `needs(name)` -> the stages `name` reads.
    """
    found: list[str] = []

    def visit(name: str) -> None:
        if name not in found:
            found.append(name)
            for upstream in needs(name):
                visit(upstream)

    for target in targets:
        visit(target)
    return found


@lru_cache(maxsize=1)
def stage_names() -> tuple[str, ...]:
    """The stage modules' names, alphabetically, found without importing them."""
    return tuple(sorted(p.stem for p in STAGES_DIR.glob("*.py") if not p.stem.startswith("_") and
                        "\nSTAGE = Stage(" in p.read_text()))


def stage_summary(name: str) -> str:
    """The first line of a stage module's docstring, read without importing it."""
    tree = ast.parse((STAGES_DIR / f"{name}.py").read_text())
    return ((ast.get_docstring(tree) or "").strip().splitlines() or [""])[0]


@lru_cache(maxsize=1)
def all_stages() -> dict[str, Stage]:
    """Every stage by name, upstream stages before the ones that need them."""
    found: dict[str, Stage] = {}
    for module_name in stage_names():
        stage = importlib.import_module(f"stages.{module_name}").STAGE
        if stage.name != module_name:
            raise RuntimeError(f"stages/{module_name}.py: STAGE.name {stage.name!r} must be the module's name")
        found[stage.name] = stage
    sections = [stage.section for stage in found.values()]
    duplicated = {s for s in sections if sections.count(s) > 1}
    if duplicated:
        raise RuntimeError(f"two stages own the config section(s) {sorted(duplicated)}")
    for stage in found.values():
        unknown = [name for name in stage.needs if name not in found]
        if unknown:
            raise RuntimeError(f"stage {stage.name!r} needs unknown stage(s) {unknown}")
    return {name: found[name] for name in in_run_order(found, lambda name: found[name].needs)}


def predicting_stages() -> tuple[str, ...]:
    """The stages whose output is a predictions folder (those that declare `Stage.predicts`), in run order."""
    return tuple(name for name, stage in all_stages().items() if stage.predicts is not None)
