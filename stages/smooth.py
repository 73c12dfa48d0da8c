"""smooth: blend each test image's probabilities with its nearest test images' (State Farm's winning trick).

Recipe: read the valid and test probabilities of `smooth.source` (the split's validation rows, or
with `cv` every training row out of fold) and precompute's clean features of the same rows (ids
checked) -> for each test row, its `k` nearest other test rows by `metric` on
the flattened features -> p' = (1 - weight) * p + weight * the neighbours' mean p (1 / distance
weighted with `distance_weighted`) -> the same on the validation rows with neighbours among the
validation rows only (with `match_test_size`, only within their set of about the test set's size,
whole groups: a neighbour as near as a test row's), which measures what smoothing does (valid log
loss before and after in the manifest and `kp status`).

With `tune: true`, k and weight come from `grid`, chosen on validation rows by cross-fitting: the
validation rows are cut in two halves (by group, e.g. driver, when the competition has groups),
each half is smoothed with the setting chosen on the other half, and that is the reported score;
the test rows get the setting chosen on all validation rows. No reported row chose its own
setting. With `tune: false`, `k` and `weight` are used as given. When the source kept each fold
model's test probabilities (cv), they are smoothed with the same k and weight, for `pseudo`'s
students. The procedure is `pipeline.evaluation.smoothing.smooth_predictions` (pseudo's `smooth`
runs it too).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import FOLD_TEST_FILE, PREDICTION_FILES, TOP_LOSSES_PLOT
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.evaluation.smoothing import METRICS



class Grid(StrictModel):
    k: list[int] = Field(min_length=1)
    weight: list[float] = Field(min_length=1)


class Settings(StrictModel):
    """The `smooth` section: blend each test row's probabilities with its nearest test rows' (validation rows alike)."""

    source: str = Field("ensemble", description=(
        "the predicting stage whose predictions are smoothed: finetune | bnretrain | tune | ensemble | cv | blend "
        "(a pseudo student's own: pseudo.smooth)"))
    k: int = Field(5, ge=1, description="neighbours per row (never itself; test rows only among test rows)")
    weight: float = Field(0.5, ge=0, le=1, description=(
        "p' = (1 - weight) p + weight * the neighbours' mean p (0: unchanged)"))
    metric: Literal[METRICS] = Field("cosine", description="cosine | euclidean, on precompute's clean features")
    distance_weighted: bool = Field(False, description="weight each neighbour by 1 / distance")
    match_test_size: bool = Field(True, description=(
        "validation rows find neighbours only within sets of about the test set's size (whole groups)"))
    tune: bool = Field(False, description=(
        "choose k and weight from grid on validation, cross-fitted over two halves (by group)"))
    grid: Grid = Field({"k": [1, 3, 5, 10, 20, 40], "weight": [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]}, description=(
        "tune: the settings tried"))
    seed: int = Field(0, description="tune: which rows (or groups) form each half")


def run(ctx: StageContext) -> dict:
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import (load_fold_test, load_predictions, save_fold_test, save_predictions,
                                                 validation_kind)
    from pipeline.evaluation.smoothing import smooth_predictions

    s = ctx.settings
    source = ctx.input(s.source)
    before = load_predictions(source)
    # cv's fold models, smoothed alike for students taught fold by fold (pseudo)
    fold_test = load_fold_test(source, len(before.test_ids)) if (source / FOLD_TEST_FILE).exists() else None
    after, result, smoothed_folds = smooth_predictions(ctx.config, ctx.inputs, before, s, str(source), fold_test)
    save_predictions(ctx.out, after)
    if smoothed_folds is not None:
        save_fold_test(ctx.out, smoothed_folds)
    return {"source": s.source, "validation": validation_kind(source), **result,
            **write_mistakes(ctx.config, ctx.input("download"), after, ctx.out, f"{ctx.comp} smooth")}


def headline(m: dict) -> str:
    how = "tuned, cross-fitted" if m["tune"] else "as set"
    return (f"{m['source']} smoothed over {m['k']} {m['metric']} neighbours, weight {m['weight']} ({how}): "
            f"val log loss {m['val_log_loss_before']:.4f} -> {m['val_log_loss']:.4f}")


STAGE = Stage(
    name="smooth",
    settings=Settings,
    run=run,
    needs=("download", "precompute", "split"),
    reads=MISTAKES_READS,
    outs=(*PREDICTION_FILES, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: (config.section("smooth").source,),
    predicts=Predicts(source=lambda config: config.section("smooth").source, smooths=True),
    reads_predictions=lambda s: {"smooth.source": s.source},
)
