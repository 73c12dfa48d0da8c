"""The variants a stage reads (`Stage.variants`): each one's config, built from the competition's without
writing anything; the runner makes their folders (`work/COMP/_variants/NAME/`) when it runs them."""
from __future__ import annotations

from pipeline.core.errors import PipelineError
from pipeline.core.stage import Stage, Variant
from pipeline.engine.config import ResolvedConfig
from pipeline.engine.registry import all_stages


def variant_configs(config: ResolvedConfig, stage: Stage) -> list[tuple[Variant, ResolvedConfig]]:
    """Each variant `stage` reads under `config`, with the variant's config (listing only its target and
    the stages that needs).

    Raises:
        PipelineError: a variant named as a stage, two variants of one name, or a variant whose target
            reads `stage` itself (it would wait on its own result).
    """
    if stage.variants is None:
        return []
    result, stages = [], all_stages()
    for request in stage.variants(stage.view(config)):
        if request.name in stages or any(request.name == known.name for known, _ in result):
            raise PipelineError(f"{request.where}: the name {request.name!r} is taken (a stage or another variant of "
                                f"{stage.name}): give it another")
        variant = config.variant_of(request.name, request.overrides, request.target, request.where)
        if stage.name in variant.model.stages:
            raise PipelineError(f"{request.where}: {request.target} reads {stage.name} itself under these settings; "
                                f"a variant {stage.name} reads must not need {stage.name}")
        result.append((request, variant))
    return result
