"""distill: one network's head taught by a teacher's out-of-fold probabilities, the fast model a kernel's time limit needs.

The model a competitor submits is often a blend of several networks, each with its folds' models
and test passes: its kernel computes every network's features of every hidden test image. A
distilled student reads one network's features (precompute's) and learns, for every training row,
what the teacher predicted for that row out of fold, mixed with its label (knowledge distillation:
the teacher's soft probabilities carry how alike the classes look), so it keeps much of the
teacher's score at one network's cost.

Recipe: read the teacher's out-of-fold probabilities (`distill.teacher`: a predicting stage that
predicted every training row out of fold: cv, a blend of cv sources, smooth of one of them) ->
each training row's target = `alpha` x the teacher's row + (1 - alpha) x its one-hot label -> cross-
validate finetune's recipe on the split's folds exactly as cv does (`pipeline.training.cross_validation`:
fold f's model chooses its epochs on fold g by the true labels, then trains on every fold but f
towards the targets and predicts fold f; the folds are units keyed by the teacher's probabilities
too) -> the student's out-of-fold score on the true labels beside the teacher's in the manifest and
`kp status`; its test probabilities the mean of its fold models'.

The teacher's probability of a row came from a teacher model that never saw that row, so no
training row's target is its own label copied through a model trained on it; a fold's student
still learns targets that other folds' labels shaped (as stacking on out-of-fold rows does), and
is scored on its own fold's true labels, which never reach its own targets. The test rows are never
learnt.
"""
from __future__ import annotations

from pydantic import Field

from pipeline.core.artifacts import FOLD_TEST_FILE, PREDICTION_FILES, SPLIT_FILE, TOP_LOSSES_PLOT
from pipeline.core.errors import PipelineError
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.training.recipes import needs_of, steps_of

RECIPE = "finetune"  # the student: a head on precompute's features


class Settings(StrictModel):
    """The `distill` section: a head on precompute's features taught by a teacher's out-of-fold probabilities."""

    teacher: str = Field("blend", description=(
        "the predicting stage whose out-of-fold probabilities teach (cv, blend, smooth of one of them)"))
    alpha: float = Field(0.7, ge=0, le=1, description=(
        "each training row's target: alpha x the teacher's probabilities + (1 - alpha) x its label (0: the labels)"))
    seed: int = Field(0, ge=0, description="every fold's student trains with this seed")


def run(ctx: StageContext) -> dict:
    import hashlib

    import numpy as np

    from pipeline.core.cache import Manifest
    from pipeline.core.readers import read_table
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import load_predictions, save_fold_test, save_predictions
    from pipeline.training.cross_validation import cross_validate

    s = ctx.settings
    teacher = load_predictions(ctx.input(s.teacher))
    ids = read_table(ctx.input("split") / SPLIT_FILE, dtype={"id": str})["id"].tolist()
    position = {row_id: i for i, row_id in enumerate(teacher.valid_ids)}
    missing = [row_id for row_id in ids if row_id not in position]
    if missing:
        raise PipelineError(f"distill.teacher {s.teacher}: it predicted {len(ids) - len(missing)} of the {len(ids)} "
                            "training rows; a student learns out-of-fold probabilities of every training row (a cv, "
                            "a blend of cv sources, or smooth of one)")
    order = [position[row_id] for row_id in ids]
    labels = np.asarray(teacher.valid_labels)[order]
    taught = np.asarray(teacher.valid_probs, dtype=np.float64)[order]
    targets = (s.alpha * taught + (1 - s.alpha) * np.eye(taught.shape[1])[labels]).astype(np.float32)
    digest = hashlib.sha256(targets.tobytes()).hexdigest()[:16]
    out_of_fold, fold_rows, fold_test = cross_validate(ctx, steps_of(RECIPE, ctx.config), RECIPE, s.seed, "distill",
                                                       targets, digest)
    save_predictions(ctx.out, out_of_fold)
    save_fold_test(ctx.out, fold_test)
    teacher_score = evaluate(labels, teacher.valid_probs[order])
    metrics = evaluate(out_of_fold.valid_labels, out_of_fold.valid_probs)
    return {
        "source": RECIPE,
        "teacher": s.teacher,
        "teacher_validation": Manifest.read(ctx.input(s.teacher)).metrics.get("validation"),
        "alpha": s.alpha,
        "validation": f"cv{len(fold_rows)}-oof",
        "folds": len(fold_rows),
        "trained": sum(not r["reused"] for r in fold_rows),
        **metrics,
        "teacher_val_log_loss": teacher_score["val_log_loss"],
        "teacher_val_accuracy": teacher_score["val_accuracy"],
        "gap_to_teacher": round(metrics["val_log_loss"] - teacher_score["val_log_loss"], 5),
        "fold_runs": fold_rows,
        **write_mistakes(ctx.config, ctx.input("download"), out_of_fold, ctx.out, f"{ctx.comp} distilled student"),
    }


def headline(m: dict) -> str:
    return (f"a head on one network's features x {m['folds']} folds taught by {m['teacher']} (alpha {m['alpha']}): "
            f"OOF log loss {m['val_log_loss']:.4f} (teacher {m['teacher_val_log_loss']:.4f}, "
            f"{m['gap_to_teacher']:+.4f}), accuracy {m['val_accuracy']:.4f}")


STAGE = Stage(
    name="distill",
    settings=Settings,
    run=run,
    needs=("download", "precompute", "split"),
    reads=("split.strategy", *MISTAKES_READS),
    outs=(*PREDICTION_FILES, FOLD_TEST_FILE, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: (config.section("distill").teacher, *needs_of(steps_of(RECIPE, config), config)),
    recipes=lambda config: steps_of(RECIPE, config),
    predicts=Predicts(models=("folds", "fold_runs"), recipe=lambda config: RECIPE, out_of_fold=True),
    reads_predictions=lambda s: {"distill.teacher": s.teacher},
)
