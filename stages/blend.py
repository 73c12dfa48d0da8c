"""blend: combine several networks' (or recipes') out-of-fold predictions with weights chosen out of fold.

Each source is a predicting stage (cv, smooth, ensemble ...) of a variant of this competition: the
config with a feature set of `features` (another backbone, weights, input size, cut) and the
source's own `set` applied. Its stage links live in `work/COMP/_variants/NAME/` and its results in
the competition's run cache, so what the variants share (the download, the split, one backbone's
features) is computed once, and adding a source computes only what is new to it.

Recipe: every source is a variant (`Stage.variants`) the engine brings up to date before the blend
runs, its stage and what that needs, as `kp` would -> read their validation and test probabilities
(the same rows, ids checked) -> cut the validation rows into folds: the split's folds when the
sources predicted every training row out of fold (cv), else `folds` folds of whole groups -> blend
each fold's rows with what `method` chose on the other folds' rows (cross-fitting: no reported row
chooses its own weights), and the test rows with what it chose on all rows; what it chose on all rows
in `blender.json` (the kernel applies it as kp did); each fold model's test
probabilities (cv's `fold_test_probs.npy`) with what was chosen without that fold, for `pseudo`'s
students -> the manifest and `kp status`: each source's score, the weights, and the blend's gain
over the best source. The methods are `pipeline.evaluation.blending`.
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.artifacts import BLENDER_FILE, FOLD_TEST_FILE, INDEX_FILE, PREDICTION_FILES, SPLIT_FILE, TOP_LOSSES_PLOT
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext, Variant
from pipeline.evaluation.blending import METHODS
from pipeline.evaluation.mistakes import MISTAKES_READS

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# what every source shares with the competition (its rows are blended row by row), so no source's `set` changes
SHARED_SECTIONS = ("download", "split", "competition", "blend", "paths")


class Source(StrictModel):
    """One entry of `blend.sources`: a predicting stage under a feature set and other changed settings."""

    stage: str = Field(description="the predicting stage whose predictions are blended (not blend itself)")
    features: str | None = Field(None, description="a feature set of `features` (null: precompute as configured)")
    set: dict[str, Any] = Field({}, description="other settings changed for this source, dotted key -> value")
    name: str | None = Field(None, description=(
        "its folder (work/COMP/_variants/NAME/) and name in reports (default: FEATURES-STAGE)"))

    @field_validator("name")
    @classmethod
    def _plain(cls, value):
        if value is not None and not NAME.fullmatch(value):
            raise ValueError(f"a source's name is a plain folder name (letters, digits, '.', '-', '_'), got {value!r}")
        return value

    @property
    def label(self) -> str:
        return self.name or f"{self.features or 'base'}-{self.stage}"


class Settings(StrictModel):
    """The `blend` section: several sources' predictions, combined with weights chosen out of fold."""

    sources: list[Source] = Field([], description=(
        "the predictions blended (at least two): {stage, features, set, name} each"))
    method: Literal[METHODS] = Field("weights", description=(
        "weights: non-negative, summing to one, minimising log loss | hill_climb: ensemble selection | "
        "stack: logistic regression on the sources' log-probabilities"))
    rounds: int = Field(100, ge=1, description="hill_climb: the most picks")
    stack_c: float = Field(1.0, gt=0, description="stack: inverse L2 strength of the logistic regression")
    folds: int = Field(5, ge=2, description=(
        "cross-fitting folds (whole groups) when the sources' rows are a holdout; cv sources use the split's folds"))
    seed: int = Field(0, ge=0, description="which groups form each cross-fitting fold")

    @model_validator(mode="after")
    def _distinct_names(self):
        labels = [source.label for source in self.sources]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise ValueError(f"two sources are named {twice[0]!r}: give each a distinct `name`")
        return self


def variants(config: ConfigReader) -> list[Variant]:
    """Each source as the variant the engine runs for it (`Stage.variants`).

    Args:
        config: a view of the competition's config that reads `blend` and `features`.
    """
    s, declared = config.section("blend"), config.get("features")
    if len(s.sources) < 2:
        raise PipelineError(f"blend.sources: {len(s.sources)} source(s); a blend needs at least two")
    result = []
    for i, source in enumerate(s.sources):
        where = f"blend.sources[{i}]"
        overrides = {}
        if source.features is not None:
            if source.features not in declared:
                raise PipelineError(f"{where}.features: no feature set {source.features!r} in `features` "
                                    f"(declared: {', '.join(declared) or 'none'})")
            overrides.update(config.section("features")[source.features].overrides())
        shared = [key for key in source.set if key.split(".")[0] in SHARED_SECTIONS]
        if shared:
            raise PipelineError(f"{where}.set: {shared[0]!r}: every source shares the competition's images, split, "
                                "classes and work folder (its rows are blended row by row); change it for the whole "
                                "competition")
        overrides.update(source.set)
        result.append(Variant(source.label, overrides, source.stage, where))
    return result


def run(ctx: StageContext) -> dict:
    import numpy as np

    from pipeline.data.index import read_index
    from pipeline.evaluation.blending import choose, cross_fit
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import Predictions, save_fold_test, save_predictions

    s = ctx.settings
    sources = [(source.label, ctx.input(source.label)) for source in s.sources]
    loaded = _aligned(sources)
    first = loaded[0][1]
    labels = first.valid_labels
    probs = np.stack([p.valid_probs for _, p, _, _ in loaded]).astype(np.float64)
    test_probs = np.stack([p.test_probs for _, p, _, _ in loaded]).astype(np.float64)
    kinds = {kind for _, _, kind, _ in loaded}
    if len(kinds) > 1:
        raise PipelineError(f"blend.sources: their validation rows are of different kinds ({sorted(kinds)}); blend "
                            "cross-validated sources together, or holdout sources together")
    kind = kinds.pop()
    split_folds = _split_folds(ctx, first.valid_ids) if kind.startswith("cv") else None
    folds = split_folds if split_folds is not None else _group_folds(
        read_index(ctx.input("download") / INDEX_FILE), first.valid_ids, labels, s.folds, s.seed)
    options = {"rounds": s.rounds, "c": s.stack_c, "seed": s.seed}
    blended, blenders = cross_fit(s.method, probs, labels, folds, **options)
    on_all = choose(s.method, probs, labels, **options)
    result = Predictions(first.valid_ids, labels, blended, first.test_ids, on_all.apply(test_probs))
    save_predictions(ctx.out, result)
    (ctx.out / BLENDER_FILE).write_text(json.dumps({"method": s.method, "sources": [label for label, _ in sources],
                                                    **on_all.to_record()}) + "\n")
    fold_tests = [fold_test for _, _, _, fold_test in loaded]
    if split_folds is not None and all(f is not None and len(f) == len(blenders) for f in fold_tests):
        stacked = np.stack(fold_tests).astype(np.float64)  # (sources, folds, test rows, classes)
        save_fold_test(ctx.out, np.stack([blenders[f].apply(stacked[:, f]) for f in sorted(blenders)]))
    scores = {label: evaluate(labels, p.valid_probs) for label, p, _, _ in loaded}
    best = min(scores, key=lambda label: scores[label]["val_log_loss"])
    metrics = evaluate(labels, blended)
    return {
        "method": s.method,
        "validation": kind,
        "sources": {label: {**scores[label], "folder": str(folder)} for label, folder in sources},
        "weights": {label: round(float(w), 4) for (label, _), w in zip(sources, on_all.weights)},
        "fold_weights": {str(f): [round(float(w), 4) for w in b.weights] for f, b in blenders.items()},
        "cross_fitting_folds": len(blenders),
        "best_source": best,
        "best_source_val_log_loss": scores[best]["val_log_loss"],
        **metrics,
        "gain_over_best": round(scores[best]["val_log_loss"] - metrics["val_log_loss"], 5),
        "val_log_loss_in_sample": round(float(evaluate(labels, on_all.apply(probs))["val_log_loss"]), 5),
        **write_mistakes(ctx.config, ctx.input("download"), result, ctx.out, f"{ctx.comp} blend"),
    }


def _aligned(sources: list[tuple[str, Any]]) -> list[tuple[str, Any, str, Any]]:
    """Each source's (label, Predictions, validation kind, fold test probabilities or None), rows in the
    first source's order; a source whose rows differ raises naming it."""
    import numpy as np

    from pipeline.evaluation.predictions import Predictions, load_fold_test, load_predictions, validation_kind

    loaded = []
    first = None
    for label, folder in sources:
        p = load_predictions(folder)
        fold_test = load_fold_test(folder, len(p.test_ids)) if (folder / FOLD_TEST_FILE).exists() else None
        if first is None:
            first = p
        else:
            for side, ids, reference in (("validation", p.valid_ids, first.valid_ids), ("test", p.test_ids, first.test_ids)):
                if sorted(ids) != sorted(reference):
                    raise PipelineError(f"blend source {label!r} ({folder}): its {side} rows are not "
                                        f"{sources[0][0]!r}'s ({len(ids)} vs {len(reference)} rows, "
                                        f"{len(set(ids) ^ set(reference))} ids in one only)")
            valid_order = _order(p.valid_ids, first.valid_ids)
            test_order = _order(p.test_ids, first.test_ids)
            if not np.array_equal(p.valid_labels[valid_order], first.valid_labels):
                raise PipelineError(f"blend source {label!r} ({folder}): its labels differ from {sources[0][0]!r}'s")
            p = Predictions(first.valid_ids, first.valid_labels, p.valid_probs[valid_order], first.test_ids,
                            p.test_probs[test_order])
            fold_test = None if fold_test is None else fold_test[:, test_order]
        loaded.append((label, p, validation_kind(folder), fold_test))
    return loaded


def _order(ids: list[str], reference: list[str]):
    position = {row_id: i for i, row_id in enumerate(ids)}
    return [position[row_id] for row_id in reference]


def _split_folds(ctx: StageContext, ids: list[str]):
    """The split's fold of each row, or None when the rows are not all the split's training rows."""
    import numpy as np

    from pipeline.core.readers import read_table

    split = read_table(ctx.input("split") / SPLIT_FILE, dtype={"id": str})
    fold_of = dict(zip(split["id"], split["fold"]))
    if len(ids) != len(fold_of) or any(row_id not in fold_of for row_id in ids):
        return None
    return np.array([fold_of[row_id] for row_id in ids])


def _group_folds(index, ids: list[str], labels, n_folds: int, seed: int):
    """`n_folds` folds of whole groups (each row its own group when the competition has none), stratified by class."""
    import numpy as np
    from sklearn.model_selection import StratifiedGroupKFold

    train = index[index.subset == "train"].set_index("id")
    groups = train["group"].reindex(ids).fillna("").to_numpy()
    groups = np.where(groups == "", np.asarray(ids, dtype=object), groups)
    n_folds = min(n_folds, len(set(groups)))
    if n_folds < 2:
        raise PipelineError("blend: the validation rows hold one group only; cross-fitting the weights needs two")
    folds = np.empty(len(ids), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, inside) in enumerate(splitter.split(np.zeros(len(ids)), labels, groups)):
        folds[inside] = fold
    return folds


def headline(m: dict) -> str:
    weights = ", ".join(f"{label} {w:.2f}" for label, w in m["weights"].items())
    return (f"{len(m['sources'])} sources by {m['method']} ({weights}): {m['validation']} log loss "
            f"{m['val_log_loss']:.4f} cross-fitted, best source {m['best_source']} {m['best_source_val_log_loss']:.4f} "
            f"(gain {m['gain_over_best']:+.4f}), accuracy {m['val_accuracy']:.4f} (best source "
            f"{m['sources'][m['best_source']]['val_accuracy']:.4f})")


STAGE = Stage(
    name="blend",
    settings=Settings,
    run=run,
    needs=("download", "split"),
    reads=("features", *MISTAKES_READS),
    outs=(*PREDICTION_FILES, BLENDER_FILE, TOP_LOSSES_PLOT),
    headline=headline,
    variants=variants,
    predicts=Predicts(source=lambda config: "cv"),  # its cross-validated sources' fold models teach fold by fold
    reads_predictions=lambda s: {f"blend.sources[{i}].stage": source.stage for i, source in enumerate(s.sources)},
)
