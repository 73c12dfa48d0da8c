"""Finds the stages: every module in the `stages` package that defines `STAGE`.

Adding a stage is one new module in `stages/` plus its section in `configs/defaults.yaml`; nothing
here changes. Stage modules must import only light modules at top level (TensorFlow goes inside
`run`), because `kp --help` and `kp status` import them all.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from pipeline.stage import Stage

# The product's stage order; among stages that do not need each other, this decides who comes first.
PIPELINE_ORDER = ("download", "split", "precompute", "finetune", "augment", "bnretrain", "ensemble", "submit")


@lru_cache(maxsize=1)
def all_stages() -> dict[str, Stage]:
    """Every stage by name, upstream stages before the ones that need them."""
    import stages as stages_package

    found: dict[str, Stage] = {}
    for module_info in sorted(pkgutil.iter_modules(stages_package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"stages.{module_info.name}")
        stage = getattr(module, "STAGE", None)
        if stage is None:
            continue
        if stage.name in found:
            raise RuntimeError(f"stages/{module_info.name}.py: stage name {stage.name!r} is already taken")
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

    for name in sorted(found, key=lambda n: PIPELINE_ORDER.index(n) if n in PIPELINE_ORDER else len(PIPELINE_ORDER)):
        visit(name, ())
    return order
