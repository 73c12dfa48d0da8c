"""Pseudo-labelling: a student taught a teacher's soft probabilities on the test rows only, scored on rows
that were never unlabeled data; each fold's student taught by its own fold's teacher."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_fold_test, load_predictions
from pipeline.evaluation.smoothing import neighbours, smooth
from pipeline.models.heads import build_head
from pipeline.training.fit import FitOptions, Phase, fit
from pipeline.training.pseudo import PseudoLabels, Teaching, check_unlabeled, mixed_batches, pseudo_share
from tests.helpers import make_statefarm_like, statefarm_like_config
from tests.test_cv import CV, _cross_validated
from tests.test_transfer import TINY_VGG

CV_PSEUDO = [s.replace("cv, submit", "cv, smooth, pseudo, submit") for s in CV] + [
    "smooth.source=cv", "smooth.k=2", "smooth.weight=0.5", "pseudo.source=smooth", "submit.source=pseudo"]


@pytest.fixture
def cv_pseudo_run(warm_project):
    """cv's warm run, then smooth, pseudo and submit (run once per session, copied per test)."""
    warm_project("cv-pseudo", lambda root: runner.run(load_config("synth", sets=CV_PSEUDO)),
                 base=("cv", _cross_validated))
    return load_config("synth", sets=CV_PSEUDO)


def test_validation_rows_are_refused_as_unlabeled_data(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=2, test=2)
    statefarm_like_config(project, archive)
    with pytest.raises(PipelineError, match=r"pseudo.unlabeled.*validation rows cannot be unlabeled data"):
        load_config("synth", sets=CV_PSEUDO + ["pseudo.unlabeled=[test, valid]"])
    check_unlabeled(["t1", "t2"], ["a", "b"], ["c"], "teacher")  # test rows only: fine
    with pytest.raises(PipelineError, match=r"teacher: 1 of the unlabeled rows are validation \(reported\) rows "
                                            r"\(first: 'c'\)"):
        check_unlabeled(["t1", "c"], ["a", "b"], ["c"], "teacher")
    with pytest.raises(PipelineError, match="are labelled training rows"):
        check_unlabeled(["a"], ["a", "b"], ["c"], "teacher")


def test_every_batch_holds_its_share_of_pseudo_rows_with_the_teachers_probabilities():
    rng = np.random.default_rng(0)
    x, y = np.arange(50, dtype=np.float32)[:, None], rng.integers(0, 3, 50)
    soft = rng.dirichlet(np.ones(3), 7).astype(np.float32)
    pseudo = PseudoLabels(100 + np.arange(7, dtype=np.float32)[:, None], soft)
    batches = mixed_batches(x, y, pseudo, batch_size=8, weight=0.25, seed=3)
    assert pseudo_share(8, 0.25) == 3 and len(batches) == 7  # 8 labelled rows per step, as without: ceil(50 / 8)
    for epoch in range(2):
        seen, taught = [], []
        for b in range(len(batches)):
            xb, tb = batches[b]
            labelled = xb[:, 0] < 100
            assert (~labelled).sum() == 3 and (~labelled[:labelled.sum()]).sum() == 0  # pseudo rows at the end
            rows = xb[labelled, 0].astype(int)
            np.testing.assert_array_equal(tb[labelled], np.eye(3)[y[rows]])  # one-hot true labels
            extra = xb[~labelled, 0].astype(int) - 100
            np.testing.assert_array_equal(tb[~labelled], soft[extra])  # the teacher's probabilities
            seen += rows.tolist()
            taught += extra.tolist()
        assert sorted(seen) == list(range(50))  # every labelled row once per epoch
        assert sorted(taught[:14]) == sorted(list(range(7)) * 2)  # every pseudo row before any repeats
        assert len(taught) == 21
        batches.on_epoch_end()
    again = mixed_batches(x, y, pseudo, batch_size=8, weight=0.25, seed=3)
    np.testing.assert_array_equal(again[0][0], mixed_batches(x, y, pseudo, 8, 0.25, seed=3)[0][0])  # seeded


def _train(x, y, x_valid, y_valid, pseudo=None, weight=0.5):
    keras.utils.set_random_seed(0)
    model = build_head((x.shape[1],), 2, "pool", [8], [0.0])
    train = (x, y) if pseudo is None else mixed_batches(x, y, pseudo, 16, weight, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        fit(model, train, (x_valid, y_valid), FitOptions(phases=[Phase(30, 0.01)], schedule="phases", optimizer="adam",
            momentum=0.0, batch_size=16, out_dir=Path(folder), verbose=0, soft_targets=pseudo is not None))
    return model


def test_a_student_learns_the_teachers_soft_labels_on_the_unlabeled_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    far = rng.normal(size=(32, 2)).astype(np.float32) + [0.0, 6.0]  # a region no labelled row covers
    teacher = np.tile([[0.2, 0.8]], (len(far), 1)).astype(np.float32)  # the teacher: class 1, 80% sure
    plain = _train(x, y, x, y).predict(far, verbose=0)[:, 1]
    taught = _train(x, y, x, y, PseudoLabels(far, teacher)).predict(far, verbose=0)[:, 1]
    assert abs(taught.mean() - 0.8) < 0.1  # soft labels: it learns the teacher's 0.8, not a hard 1.0
    assert abs(plain.mean() - 0.8) > abs(taught.mean() - 0.8)


def test_fold_students_are_taught_by_their_own_folds_teacher_and_scored_out_of_fold(cv_pseudo_run):
    work = cv_pseudo_run.work_dir
    m = Manifest.read(work / "pseudo").metrics
    assert m["validation"] == "cv4-oof" and m["recipe"] == "finetune" and m["trained"] == 4
    split = pd.read_csv(work / "split" / "split.csv", dtype={"id": str})
    student = load_predictions(work / "pseudo")
    assert student.valid_ids == split["id"].tolist()  # every training row, once, out of fold
    cv_runs = {run["fold"]: run for run in Manifest.read(work / "cv").metrics["fold_runs"]}
    # the teacher (smooth of cv) kept each fold model's test probabilities, smoothed as the mean was
    cv_folds = load_fold_test(work / "cv", len(student.test_ids), 4)
    teachers = load_fold_test(work / "smooth", len(student.test_ids), 4)
    precomputed = np.load(work / "precompute" / "test.npy").astype(np.float32)
    near = neighbours(precomputed, 2, "cosine")
    for f in range(4):
        np.testing.assert_allclose(teachers[f], smooth(cv_folds[f], near, 2, 0.5), rtol=1e-6)
    np.testing.assert_allclose(load_predictions(work / "smooth").test_probs, smooth(cv_folds.mean(axis=0), near, 2, 0.5),
                               rtol=1e-5)
    tests = []
    for row in m["students"]:
        f = row["fold"] - 1
        unit = work / "_runs" / "pseudo-students" / row["key"]
        record = json.loads((unit / "unit.json").read_text())
        assert record["taught"] == Teaching(teachers[f], np.ones(6, bool), 0.25).digest()  # fold f's own teacher
        assert record["taught"] != Teaching(teachers[(f + 1) % 4], np.ones(6, bool), 0.25).digest()
        assert record["pseudo_rows"] == 6 and record["pseudo_per_batch"] == 5  # added to 16 labelled rows
        history = pd.read_csv(unit / "history.csv")
        assert len(history) == cv_runs[row["fold"]]["chosen_epochs"]["finetune"]  # epochs cv chose on another fold
        assert history.get("val_loss", pd.Series([np.nan])).isna().all()  # its own fold never scored in training
        held_out = split["fold"].to_numpy() == f
        unit_predictions = load_predictions(unit)
        assert unit_predictions.valid_ids == split["id"][held_out].tolist()
        np.testing.assert_array_equal(student.valid_probs[held_out], unit_predictions.valid_probs)
        tests.append(unit_predictions.test_probs)
    np.testing.assert_allclose(student.test_probs, np.mean(tests, axis=0), rtol=1e-6)
    assert m["gain_over_teacher"] == pytest.approx(m["teacher_val_log_loss"] - m["student_val_log_loss"], abs=1e-4)
    submit = json.loads((work / "submit" / "submission.json").read_text())
    assert submit["source"] == "pseudo" and submit["validation"] == "cv4-oof"

    # smoothing the students' predictions again reuses every student
    runner.run(load_config("synth", sets=CV_PSEUDO + ["pseudo.smooth=true"]))
    again = Manifest.read(work / "pseudo").metrics
    assert again["trained"] == 0 and again["student_val_log_loss"] == m["student_val_log_loss"]
    assert again["smooth_k"] == 2 and again["smooth_weight"] == 0.5
    smoothed = load_predictions(work / "pseudo")
    np.testing.assert_allclose(smoothed.test_probs, smooth(student.test_probs, near, 2, 0.5), rtol=1e-5)


def test_a_holdout_student_learns_only_confident_test_rows_and_is_scored_on_the_split(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive)
    sets = [s.replace("finetune, submit", "finetune, pseudo, submit") for s in TINY_VGG] + [
        "split.strategy=group", "pseudo.source=finetune", "pseudo.threshold=0.34", "submit.source=pseudo"]
    config = load_config("synth", sets=sets)
    runner.run(config)
    work = config.work_dir
    teacher = load_predictions(work / "finetune")
    m = Manifest.read(work / "pseudo").metrics
    confident = int((teacher.test_probs.max(axis=1) >= 0.34).sum())
    assert m["validation"] == "holdout" and m["students"][0]["pseudo_rows"] == confident
    assert m["students"][0]["taught"] == Teaching(teacher.test_probs, teacher.test_probs.max(axis=1) >= 0.34,
                                                  0.25).digest()
    student = load_predictions(work / "pseudo")
    assert student.valid_ids == teacher.valid_ids  # scored on the split's validation rows
    assert (work / "pseudo" / "student" / "model.keras").exists()
    assert m["teacher_val_log_loss"] == Manifest.read(work / "finetune").metrics["val_log_loss"]


def test_packaged_students_reproduce_pseudos_test_probabilities(cv_pseudo_run, tmp_path):
    from tests.test_package import kernel_reproduces

    record = kernel_reproduces(CV_PSEUDO, "pseudo", tmp_path)
    students = Manifest.read(cv_pseudo_run.work_dir / "pseudo").metrics["students"]
    assert record["predict"]["reads"] == "features" and len(record["models"]) == len(students) > 1
    smoothed = CV_PSEUDO + ["pseudo.smooth=true"]  # the students' own rows smoothed: the kernel smooths them again
    runner.run(load_config("synth", sets=smoothed))
    record = kernel_reproduces(smoothed, "pseudo", tmp_path / "smoothed")
    assert record["predict"]["neighbours"]["k"] == Manifest.read(cv_pseudo_run.work_dir / "pseudo").metrics["smooth_k"]
