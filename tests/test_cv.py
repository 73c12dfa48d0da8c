"""Cross-validation: every training row predicted once by a model that never saw it, each fold's epochs
chosen on another fold, test predictions the mean of the fold models, fold models cached."""
from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.data.arrays import load_array
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_predictions
from tests.helpers import make_statefarm_like, statefarm_like_config
from tests.test_transfer import TINY_VGG

CV = [s.replace("finetune, submit", "cv, submit") for s in TINY_VGG] + [
    "split.strategy=group_kfold", "split.folds=4", "submit.source=cv"]


def _cross_validated(root):
    archive = make_statefarm_like(root.parent / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(root, archive)
    runner.run(load_config("synth", sets=CV))


@pytest.fixture
def cv_run(warm_project):
    """The synthetic competition through cv and submit (run once per session, copied per test)."""
    warm_project("cv", _cross_validated)
    return load_config("synth", sets=CV)


def test_out_of_fold_rows_cover_every_row_once_each_from_the_model_that_never_saw_it(cv_run):
    work = cv_run.work_dir
    m = Manifest.read(work / "cv").metrics
    assert m["validation"] == "cv4-oof" and m["folds"] == 4 and m["trained"] == 4
    split = pd.read_csv(work / "split" / "split.csv", dtype={"id": str})
    oof = load_predictions(work / "cv")
    assert oof.valid_ids == split["id"].tolist()  # every training row, once, in split order
    features = np.asarray(load_array(work / "precompute" / "train.npy"), np.float32)
    tests = []
    for run in m["fold_runs"]:
        unit = work / "_runs" / "cv-folds" / run["key"]
        record = json.loads((unit / "unit.json").read_text())
        held_out = split["fold"].to_numpy() == run["fold"] - 1
        assert record["rows"]["held_out"] == sorted(split["id"][held_out])
        assert not set(record["rows"]["held_out"]) & set(record["rows"]["train"] + record["rows"]["selection"])
        assert not set(record["rows"]["selection"]) & set(record["rows"]["train"])
        model = keras.models.load_model(unit / "model.keras")
        np.testing.assert_allclose(oof.valid_probs[held_out], model.predict_on_batch(features[held_out]), rtol=1e-5,
                                   atol=1e-6)
        history = pd.read_csv(unit / "history.csv")
        assert len(history) == record["chosen_epochs"]["finetune"]
        assert history.get("val_loss", pd.Series([np.nan])).isna().all()  # the held-out rows were never scored
        selection = pd.read_csv(unit / "selection" / "history.csv")["val_loss"]
        assert selection.notna().all()  # the epochs were chosen on fold g: the epoch of its lowest loss
        assert record["chosen_epochs"]["finetune"] == int(selection.to_numpy().argmin()) + 1
        tests.append(load_predictions(unit).test_probs)
    np.testing.assert_allclose(oof.test_probs, np.mean(tests, axis=0), rtol=1e-6)
    labels = np.array([["c0", "c1", "c2"].index(c) for c in pd.read_csv(work / "download" / "index.csv").query(
        "subset == 'train'").set_index("id").loc[oof.valid_ids, "label"]])
    assert m["val_log_loss"] == pytest.approx(sk_log_loss(labels, oof.valid_probs, labels=[0, 1, 2]), abs=1e-4)
    fold_losses = [sk_log_loss(labels[split["fold"].to_numpy() == f], oof.valid_probs[split["fold"].to_numpy() == f],
                               labels=[0, 1, 2]) for f in range(4)]
    assert m["fold_val_log_loss_min"] == pytest.approx(min(fold_losses), abs=1e-4)
    submit = json.loads((work / "submit" / "submission.json").read_text())
    assert submit["source"] == "cv"


def test_fold_models_are_cached_and_ignore_settings_they_do_not_use(cv_run):
    before = Manifest.read(cv_run.work_dir / "cv")
    config = load_config("synth", sets=CV + ["bnretrain.dropout=0.2", "ensemble.n=3"])
    runner.run(config)
    assert Manifest.read(cv_run.work_dir / "cv").finished == before.finished  # the stage does not even rerun
    runner.run(config, ["cv"], force=True)
    assert Manifest.read(cv_run.work_dir / "cv").metrics["trained"] == 0  # rerun, it reuses every fold


def test_folds_that_train_the_whole_schedule_choose_nothing_and_train_once(cv_run):
    config = load_config("synth", sets=CV + ["cv.epochs=schedule"])
    runner.run(config, ["cv"])
    work = cv_run.work_dir
    m = Manifest.read(work / "cv").metrics
    assert m["trained"] == 4 and m["validation"] == "cv4-oof"  # new fold models: their key says how epochs were set
    split = pd.read_csv(work / "split" / "split.csv", dtype={"id": str})
    features = np.asarray(load_array(work / "precompute" / "train.npy"), np.float32)
    oof = load_predictions(work / "cv")
    for run in m["fold_runs"]:
        unit = work / "_runs" / "cv-folds" / run["key"]
        record = json.loads((unit / "unit.json").read_text())
        held_out = split["fold"].to_numpy() == run["fold"] - 1
        assert record["rows"]["selection"] == [] and record["selection_fold"] is None
        assert sorted(record["rows"]["train"]) == sorted(split["id"][~held_out])  # every other fold trains it
        assert not (unit / "selection").exists()
        assert run["chosen_epochs"] == {"finetune": 3} and len(pd.read_csv(unit / "history.csv")) == 3  # 2 + 1
        np.testing.assert_allclose(oof.valid_probs[held_out],
                                   keras.models.load_model(unit / "model.keras").predict_on_batch(features[held_out]),
                                   rtol=1e-5, atol=1e-6)


def test_cv_needs_folds(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=2, test=2)
    statefarm_like_config(project, archive)
    with pytest.raises(PipelineError, match="split.strategy is 'group'"):
        runner.run(load_config("synth", sets=[s for s in CV if not s.startswith("split.")]), ["cv"])


def test_smoothing_out_of_fold_rows_and_submitting_says_the_score_is_out_of_fold(cv_run):
    sets = [s.replace("cv, submit", "cv, smooth, submit") for s in CV] + [
        "smooth.source=cv", "smooth.tune=true", "smooth.grid={k: [1, 3], weight: [0.0, 0.5]}", "submit.source=smooth"]
    runner.run(load_config("synth", sets=sets))
    work = cv_run.work_dir
    smoothed = Manifest.read(work / "smooth").metrics
    assert smoothed["validation"] == "cv4-oof" and smoothed["halves_by"] == "group"
    assert load_predictions(work / "smooth").valid_ids == load_predictions(work / "cv").valid_ids
    meta = json.loads((work / "submit" / "submission.json").read_text())
    assert meta["source"] == "smooth" and meta["validation"] == "cv4-oof"


def test_a_ledger_written_before_the_validation_column_still_reads(tmp_path):
    from pipeline.kaggle.ledger import COLUMNS, format_ledger, read_ledger

    old = [c for c in COLUMNS if c != "validation"]
    path = tmp_path / "ledger.csv"
    path.write_text(",".join(old) + "\n" + ",".join("1.0" if c in ("val_score", "lb_score", "difference", "ref") else
                                                  ("group" if c == "split_strategy" else "x") for c in old) + "\n")
    rows = read_ledger(path)
    assert rows[0]["validation"] == "holdout" and "group" in format_ledger(rows)
    assert "group_kfold cv4-oof" in format_ledger([{**rows[0], "split_strategy": "group_kfold",
                                                    "validation": "cv4-oof"}])


DISTILL = [s.replace("cv, submit", "cv, distill, submit") for s in CV] + ["distill.teacher=cv"]


def test_a_distilled_student_learns_the_teachers_out_of_fold_rows_and_is_scored_on_the_labels(cv_run, tmp_path):
    """distill on the warm cv at alpha 1: each training row learns cv's out-of-fold row; the student's score
    sits beside the teacher's in the manifest and `kp status`; its fold heads package as one network's kernel."""
    from click.testing import CliRunner

    from pipeline.cli.commands import cli
    from tests.test_package import kernel_reproduces

    sets = DISTILL + ["distill.alpha=1"]
    runner.run(load_config("synth", sets=sets))
    work = cv_run.work_dir
    m = Manifest.read(work / "distill").metrics
    assert m["teacher"] == "cv" and m["validation"] == "cv4-oof" and m["trained"] == 4
    assert m["teacher_val_log_loss"] == Manifest.read(work / "cv").metrics["val_log_loss"]
    assert not np.allclose(load_predictions(work / "distill").valid_probs, load_predictions(work / "cv").valid_probs,
                           atol=1e-4)
    shown = CliRunner().invoke(cli, ["status", "--comp", "synth", *[a for s in sets for a in ("--set", s)]]).output
    assert "taught by cv (alpha 1.0): OOF log loss" in shown and f"(teacher {m['teacher_val_log_loss']:.4f}" in shown
    record = kernel_reproduces(sets, "distill", tmp_path)
    assert len(record["models"]) == 4 and record["predict"]["reads"] == "features"


@pytest.mark.slow  # 12 s (2026-12-06): four more fold models; the test above keeps distill's own path fast
def test_a_student_taught_its_labels_alone_is_cvs_own_model(cv_run):
    """At alpha 0 the targets are the one-hot labels: the student's folds give cv's out-of-fold rows."""
    runner.run(load_config("synth", sets=DISTILL + ["distill.alpha=0"]))
    np.testing.assert_allclose(load_predictions(cv_run.work_dir / "distill").valid_probs,
                               load_predictions(cv_run.work_dir / "cv").valid_probs, atol=1e-6)


def test_a_teacher_that_predicted_only_its_validation_rows_cannot_teach(cv_run):
    sets = [s.replace("cv, submit", "finetune, cv, distill, submit") for s in CV] + ["distill.teacher=finetune"]
    with pytest.raises(PipelineError, match="distill.teacher finetune: it predicted 12 of the 48 training rows"):
        runner.run(load_config("synth", sets=sets))
