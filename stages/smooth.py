"""smooth: blend each test image's probabilities with its nearest test images' (State Farm's winning trick).

Recipe: read the valid and test probabilities of `smooth.source` (the split's validation rows, or
with `cv` every training row out of fold) and precompute's clean features of the same rows (ids
checked) -> for each test row, its `k` nearest other test rows by `metric` on
the flattened features -> p' = (1 - weight) * p + weight * the neighbours' mean p (1 / distance
weighted with `distance_weighted`) -> the same on the validation rows with neighbours among the
validation rows only, which measures what smoothing does (valid log loss before and after in the
manifest and `kp status`).

With `tune: true`, k and weight come from `grid`, chosen on validation rows by cross-fitting: the
validation rows are cut in two halves (by group, e.g. driver, when the competition has groups),
each half is smoothed with the setting chosen on the other half, and that is the reported score;
the test rows get the setting chosen on all validation rows. No reported row chose its own
setting. With `tune: false`, `k` and `weight` are used as given.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import INDEX_FILE, PREDICTION_FILES, SPLIT_FILE
from pipeline.core.errors import PipelineError
from pipeline.core.stage import Stage, StageContext, StrictModel
from pipeline.evaluation.smoothing import METRICS
from stages.submit import PREDICTING_STAGES

SOURCES = tuple(s for s in PREDICTING_STAGES if s != "smooth")


class Grid(StrictModel):
    k: list[int] = Field(min_length=1)
    weight: list[float] = Field(min_length=1)


class Settings(StrictModel):
    source: Literal[SOURCES]
    k: int = Field(ge=1)
    weight: float = Field(ge=0, le=1)
    metric: Literal[METRICS]
    distance_weighted: bool
    tune: bool
    grid: Grid
    seed: int


def run(ctx: StageContext) -> dict:
    import numpy as np
    import pandas as pd

    from pipeline.data.features import load_split_features
    from pipeline.data.index import read_index
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.predictions import Predictions, load_predictions, save_predictions, validation_kind
    from pipeline.evaluation.smoothing import choose, cross_fitted, halves, neighbours, smooth

    s = ctx.settings
    before = load_predictions(ctx.input(s.source))
    split_ids = pd.read_csv(ctx.input("split") / SPLIT_FILE, dtype={"id": str})["id"].to_numpy()
    scored = np.isin(split_ids, before.valid_ids)  # the split's validation rows, or every row out of fold (cv)
    data = load_split_features(ctx.input("precompute"), ctx.input("split"), ctx.config.competition.classes,
                               sides=(~scored, scored))
    for side, ids, expected in (("valid", before.valid_ids, data.valid_ids), ("test", before.test_ids, data.test_ids)):
        if list(ids) != list(expected):
            raise PipelineError(f"{ctx.input(s.source)}: its {side} rows are not precompute's {side} rows of this "
                                "split, in order; rerun it")
    ks = sorted(set(s.grid.k)) if s.tune else [s.k]
    weights = sorted(set(s.grid.weight)) if s.tune else [s.weight]
    valid_near = neighbours(data.x_valid, max(ks), s.metric)
    test_near = neighbours(data.x_test, max(ks), s.metric)

    result = {"source": s.source, "validation": validation_kind(ctx.input(s.source)), "metric": s.metric,
              "distance_weighted": s.distance_weighted, "tune": s.tune}
    if s.tune:
        train = read_index(ctx.input("download") / INDEX_FILE).query("subset == 'train'")
        group_of = dict(zip(train.id, train.group))
        groups = np.array([group_of[i] for i in data.valid_ids])
        groups = groups if (groups != "").all() else None  # no groups: halves of random rows
        side = halves(len(data.valid_ids), groups, s.seed)
        valid, choices = cross_fitted(before.valid_probs, data.y_valid, valid_near, ks, weights,
                                      s.distance_weighted, side)
        k, weight, _ = choose(before.valid_probs, data.y_valid, valid_near, ks, weights, s.distance_weighted,
                              np.ones(len(data.valid_ids), bool))
        result.update({"cross_fit_choices": choices, "halves_by": "group" if groups is not None else "row"})
    else:
        k, weight = s.k, s.weight
        valid = smooth(before.valid_probs, valid_near, k, weight, s.distance_weighted)
    test = smooth(before.test_probs, test_near, k, weight, s.distance_weighted)
    save_predictions(ctx.out, Predictions(before.valid_ids, before.valid_labels, valid, before.test_ids, test))
    unsmoothed = evaluate(data.y_valid, before.valid_probs)
    result.update({"k": k, "weight": weight, **evaluate(data.y_valid, valid),
                   **{f"{name}_before": value for name, value in unsmoothed.items()}})
    result["log_loss_gain"] = round(result["val_log_loss_before"] - result["val_log_loss"], 5)
    return result


def headline(m: dict) -> str:
    how = "tuned, cross-fitted" if m["tune"] else "as set"
    return (f"{m['source']} smoothed over {m['k']} {m['metric']} neighbours, weight {m['weight']} ({how}): "
            f"val log loss {m['val_log_loss_before']:.4f} -> {m['val_log_loss']:.4f}")


STAGE = Stage(
    name="smooth",
    settings=Settings,
    run=run,
    needs=("download", "precompute", "split"),
    reads=("competition.classes",),
    outs=PREDICTION_FILES,
    headline=headline,
    extra_needs=lambda config: (config.section("smooth").source,),
)
