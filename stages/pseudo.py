"""pseudo: a student trained on the training rows plus the test rows labelled by a teacher's probabilities.

The course's pseudo-labelling and knowledge distillation, without its leak (it pseudo-labelled its
validation set and then scored on it): the only unlabeled rows are the test rows, and the student
is scored on rows that were never unlabeled data.

Recipe: the teacher is `pseudo.source` (finetune, bnretrain, ensemble, cv or smooth); the student
follows the teacher's recipe (finetune's, or finetune's then bnretrain's, with their `augmented`
and `tta`) and trains on its labelled rows with `weight` of every batch drawn from the test rows,
whose targets are the teacher's probabilities (soft labels; only rows whose top probability
reaches `threshold` when one is set; with augmented passes, the test rows' passes too) ->
  - holdout teacher (the split's validation rows): one student on the split's training rows, its
    best epoch by validation loss as finetune's, taught the teacher's test probabilities;
  - cross-validated teacher (cv, or smooth of cv): one student per fold, trained on every fold but
    its own for the epochs cv chose for that fold (on another fold), taught by that fold's own
    teacher model (`fold_test_probs.npy`), so no fold's labels reach its own out-of-fold score
    through the teacher; students are units of the run cache (`_runs/pseudo-students/KEY`) ->
the student's valid (or out-of-fold) and test probabilities (test: the mean of the fold students)
-> with `smooth: true`, smoothed as the smooth stage does, with its settings, tuned on these rows ->
the manifest reports the teacher's score, the student's, the gain, and the smoothed score.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.core.artifacts import PREDICTION_FILES, SPLIT_FILE, TOP_LOSSES_PLOT
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_table
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.training.recipes import needs_of, steps_of

STUDENT_DIR = "student"  # holdout: the student's model, history, plots and own predictions


class Settings(StrictModel):
    """The `pseudo` section: a student trained on the training rows + the test rows with a teacher's probabilities as soft labels."""

    source: str = Field("smooth", description=(
        "the teacher, a predicting stage: finetune | bnretrain | ensemble | cv | smooth | blend (the student follows "
        "its models' recipe; a blend's students follow cv's, fold by fold)"))
    weight: float = Field(0.25, gt=0, lt=1, description=(
        "share of every batch drawn from the pseudo-labelled test rows (the course: 1/4 to 1/3)"))
    threshold: float | None = Field(None, ge=0, le=1, description=(
        "only test rows whose top teacher probability reaches this (null: every test row)"))
    unlabeled: list[Literal["test", "valid"]] = Field(["test"], min_length=1, description=(
        "the rows taught; never valid: the student is scored there (the course's leak is refused)"))
    smooth: bool = Field(False, description=(
        "smooth the student's predictions with the smooth section's settings (tuned on its own rows)"))
    seed: int = Field(0, description="the student's weights, shuffling and pseudo-row draws")

    @field_validator("unlabeled")
    @classmethod
    def _only_test_rows(cls, subsets: list[str]) -> list[str]:
        if "valid" in subsets:
            raise ValueError("the validation rows cannot be unlabeled data: they are the rows the student is scored "
                             "on, and a student taught the teacher's answers on them scores what it was told (the "
                             "course's leak). Use [test]")
        return subsets


def teacher_base(config: ConfigReader, source: str) -> str:
    """The stage whose models made the teacher's predictions, following each role's `Predicts.source` back:
    smooth's source for smooth; cv for a blend (a blend of cross-validated sources teaches fold by fold, with
    its `fold_test_probs.npy`, and its students follow cv's recipe on this competition's own features)."""
    role = config.predicts(source)
    while role.source is not None:
        source = role.source(config)
        role = config.predicts(source)
    return source


def student_recipe(config: ConfigReader, source: str) -> str:
    """The recipe the teacher's models followed, which the student follows too."""
    base = teacher_base(config, source)
    role = config.predicts(base)
    if role.recipe is None:
        raise PipelineError(f"pseudo.source: {source}'s predictions come from {base}, which trains no model a student "
                            "could follow")
    return role.recipe(config)


def student_steps(config: ConfigReader) -> tuple:
    """The recipes a student follows, from nothing."""
    return steps_of(student_recipe(config, config.section("pseudo").source), config)


def run(ctx: StageContext) -> dict:
    from pipeline.core.cache import Manifest, link_or_copy
    from pipeline.core.executor import UnitItem
    from pipeline.data.features import label_indices, read_rows
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.model_outputs import TRAINED_FILES, draw_training
    from pipeline.evaluation.predictions import (Predictions, load_fold_test, load_predictions, save_fold_test,
                                                 save_predictions, validation_kind)
    from pipeline.evaluation.smoothing import smooth_predictions
    from pipeline.training.cross_validation import gather_folds
    from pipeline.training.pseudo import Teaching, check_unlabeled, confident_rows
    from pipeline.training.recipes import TrainingRun, check_steps, train_unit

    s = ctx.settings
    teacher_dir = ctx.input(s.source)
    teacher = load_predictions(teacher_dir)
    kind = validation_kind(teacher_dir)
    recipe = student_recipe(ctx.config, s.source)
    steps = student_steps(ctx.config)
    check_steps(steps, ctx.config)
    split = read_table(ctx.input("split") / SPLIT_FILE, dtype={"id": str})
    ids = split["id"].to_numpy()
    test_ids = read_rows(ctx.input("precompute"), "test")["id"].tolist()
    if list(teacher.test_ids) != test_ids:
        raise PipelineError(f"{teacher_dir}: its test rows are not precompute's test rows, in order; rerun it")

    def students(items, keyed_by_item=()):
        # a student is keyed by what it is taught (`Teaching.digest`) and its rows, not by the teacher's stage
        return ctx.map_units("students", train_unit, items, "pseudo students", recipes=steps,
                             upstream=needs_of(steps, ctx.config), keyed_by_item=keyed_by_item)

    if kind == "holdout":
        valid = (split["side"] == "valid").to_numpy()
        if list(teacher.valid_ids) != list(ids[valid]):
            raise PipelineError(f"{teacher_dir}: its validation rows are not the split's; rerun it")
        check_unlabeled(teacher.test_ids, ids[~valid], ids[valid], str(teacher_dir))
        keep = confident_rows(teacher.test_probs, s.threshold)
        teaching = Teaching(teacher.test_probs, keep, s.weight)
        [unit] = students([UnitItem("the student", {"seed": s.seed, "taught": teaching.digest()},
                                    (steps, None, None,
                                     TrainingRun(s.seed, "student", teaching=teaching)))])
        (ctx.out / STUDENT_DIR).mkdir()
        for name in TRAINED_FILES:
            link_or_copy(unit.folder / name, ctx.out / STUDENT_DIR / name)
        draw_training(ctx.out / STUDENT_DIR, ctx.config.competition.classes, f"{ctx.comp} student")
        student = load_predictions(unit.folder)
        fold_test, taught = None, [{"fold": None, "reused": unit.reused, "key": unit.key,
                                    "pseudo_rows": int(keep.sum()), "taught": teaching.digest(),
                                    "best_epoch": unit.record["best_epoch"],
                                    **evaluate(student.valid_labels, student.valid_probs)}]
    else:
        if list(teacher.valid_ids) != list(ids):
            raise PipelineError(f"{teacher_dir}: its out-of-fold rows are not every row of {SPLIT_FILE}; rerun it")
        folds = split["fold"].to_numpy()
        n_folds = int(folds.max()) + 1
        teachers = load_fold_test(teacher_dir, len(teacher.test_ids), n_folds)
        fold_runs = Manifest.read(ctx.input(teacher_base(ctx.config, s.source))).metrics["fold_runs"]
        chosen = {run["fold"]: run["chosen_epochs"] for run in fold_runs}
        labels = label_indices(read_rows(ctx.input("precompute"), "train")["label"], ctx.config.competition.classes)
        items, teachings = [], []
        for f in range(n_folds):
            held_out = folds == f
            check_unlabeled(teacher.test_ids, ids[~held_out], ids[held_out], str(teacher_dir))
            teaching = Teaching(teachers[f], confident_rows(teachers[f], s.threshold), s.weight)
            teachings.append(teaching)
            rows = {"train": sorted(ids[~held_out]), "held_out": sorted(ids[held_out])}
            items.append(UnitItem(
                f"fold {f + 1}/{n_folds} student ({chosen[f + 1]} epochs, taught by fold {f + 1}'s teacher)",
                {"seed": s.seed, "fold": f, "rows": rows, "epochs": chosen[f + 1], "taught": teaching.digest()},
                (steps, None, (~held_out, held_out),
                 TrainingRun(s.seed, f"fold {f + 1} student", epochs=chosen[f + 1], teaching=teaching))))
        units = students(items, keyed_by_item=("split",))
        oof, fold_test, each = gather_folds(units, folds, ids, teacher.valid_probs.shape[1])
        taught = [{"fold": f + 1, "reused": unit.reused, "key": unit.key, "pseudo_rows": int(teaching.keep.sum()),
                   "taught": teaching.digest(), "chosen_epochs": chosen[f + 1],
                   **evaluate(labels[folds == f], predictions.valid_probs)}
                  for f, (unit, teaching, predictions) in enumerate(zip(units, teachings, each))]
        student = Predictions(list(ids), labels, oof, teacher.test_ids, fold_test.mean(axis=0))

    teacher_scores = evaluate(teacher.valid_labels, teacher.valid_probs)
    student_scores = evaluate(student.valid_labels, student.valid_probs)
    result = {"source": s.source, "recipe": recipe, "validation": kind, "weight": s.weight, "threshold": s.threshold,
              **{f"teacher_{name}": value for name, value in teacher_scores.items()},
              **{f"student_{name}": value for name, value in student_scores.items()},
              "gain_over_teacher": round(teacher_scores["val_log_loss"] - student_scores["val_log_loss"], 5),
              "trained": sum(not row["reused"] for row in taught), "students": taught, **student_scores}
    final = student
    if s.smooth:
        final, smoothing, fold_test = smooth_predictions(ctx.config, ctx.inputs, student, ctx.config.section("smooth"),
                                                         "the student's predictions", fold_test)
        result.update({**{f"smooth_{name}": value for name, value in smoothing.items()
                          if not name.startswith("val_")}, **evaluate(student.valid_labels, final.valid_probs)})
    save_predictions(ctx.out, final)
    if fold_test is not None:
        save_fold_test(ctx.out, fold_test)
    return {**result, **write_mistakes(ctx.config, ctx.input("download"), final, ctx.out, f"{ctx.comp} pseudo")}


def headline(m: dict) -> str:
    smoothed = f", smoothed {m['val_log_loss']:.4f}" if "smooth_k" in m else ""
    return (f"{m['recipe']} student of {m['source']} ({m['validation']}, {m['weight']:.2f} pseudo per batch): "
            f"val log loss {m['teacher_val_log_loss']:.4f} -> {m['student_val_log_loss']:.4f}{smoothed}")


STAGE = Stage(
    name="pseudo",
    settings=Settings,
    run=run,
    needs=("download", "precompute", "split"),
    reads=("smooth", "ensemble.source", "cv.source", *MISTAKES_READS),
    outs=(*PREDICTION_FILES, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: tuple(dict.fromkeys(
        (config.section("pseudo").source, teacher_base(config, config.section("pseudo").source),
         *needs_of(student_steps(config), config)))),
    recipes=student_steps,
    predicts=Predicts(models=("students", "students")),
    reads_predictions=lambda s: {"pseudo.source": s.source},
)
