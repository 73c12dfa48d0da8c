"""Finds the stages: every module in the `stages` package that defines `STAGE` (named as its module).

Adding a stage is one new module in `stages/` plus its section in `configs/defaults.yaml`; nothing
here changes. `stage_names` and `stage_summary` read the package's files without importing them,
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

STAGES_DIR = Path(__file__).resolve().parents[1] / "stages"
# The product's stage order; among stages that do not need each other, this decides who comes first.
PIPELINE_ORDER = ("download", "split", "precompute", "augment", "finetune", "bnretrain", "tune", "ensemble", "cv", "smooth",
                  "pseudo", "submit")


def _order(name: str) -> tuple[int, str]:
    return (PIPELINE_ORDER.index(name) if name in PIPELINE_ORDER else len(PIPELINE_ORDER), name)


@lru_cache(maxsize=1)
def stage_names() -> tuple[str, ...]:
    """The stage modules' names in pipeline order, found without importing them."""
    names = [p.stem for p in STAGES_DIR.glob("*.py") if not p.stem.startswith("_") and
             "\nSTAGE = Stage(" in p.read_text()]
    return tuple(sorted(names, key=_order))


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
    return {name: found[name] for name in _upstream_first(found)}


def _upstream_first(found: dict[str, Stage]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise RuntimeError(f"stage dependency cycle: {' -> '.join(path + (name,))}")
        if name not in found:
            raise RuntimeError(f"stage {path[-1]!r} needs unknown stage {name!r}")
        for upstream in found[name].needs:
            visit(upstream, path + (name,))
        order.append(name)

    for name in sorted(found, key=_order):
        visit(name, ())
    return order
