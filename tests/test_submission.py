"""Submission shaping, clipping and validation; Kaggle-style scoring against a solution file."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss

from pipeline.core.errors import PipelineError
from pipeline.engine.config import load_config
from pipeline.evaluation.metrics import (SCORE_NAMES, binary_log_loss, clip_probabilities, competition_score, evaluate,
                                         multiclass_log_loss, score_for)
from pipeline.evaluation.scoring import score_submission
from pipeline.evaluation.submission import in_sample_order, submission_frame, validate_submission
from tests.helpers import REPO


def competition(name):
    return load_config(name, root=REPO).competition


def test_binary_submission_is_clipped_probability_of_the_positive_class():
    dogscats = competition("dogscats")
    probs = np.array([[0.999, 0.001], [0.3, 0.7], [0.0, 1.0]])
    frame = submission_frame(["1", "2", "3"], probs, dogscats, renormalize=False)
    assert list(frame.columns) == ["id", "label"]
    assert frame.label.tolist() == pytest.approx([0.005, 0.7, 0.995])  # competition.clip [0.005, 0.995]


def test_multiclass_submission_clips_each_class_and_can_renormalise():
    statefarm = competition("statefarm")
    probs = np.full((2, 10), 0.0)
    probs[0, 3] = 1.0
    probs[1] = 0.1
    lo, hi = statefarm.clip
    plain = submission_frame(["a.jpg", "b.jpg"], probs, statefarm, renormalize=False)
    assert plain.columns.tolist() == statefarm.submission_columns
    assert plain.iloc[0, 1:].tolist() == pytest.approx([lo] * 3 + [hi] + [lo] * 6)
    renormalised = submission_frame(["a.jpg", "b.jpg"], probs, statefarm, renormalize=True)
    assert renormalised.iloc[:, 1:].sum(axis=1).tolist() == pytest.approx([1.0, 1.0])


def test_accuracy_submission_is_the_argmax_label():
    digits = competition("digits")
    probs = np.eye(10)[[7, 0, 3]]
    frame = submission_frame(["1", "2", "3"], probs, digits, renormalize=False)
    assert frame.Label.tolist() == ["7", "0", "3"]


def test_test_rows_follow_the_sample_order_with_a_fallback():
    probs, missing = in_sample_order(["c", "a", "b"], ["a", "c"], np.array([[1.0, 0.0], [0.0, 1.0]]),
                                     fallback=np.array([0.5, 0.5]))
    assert probs.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]]
    assert missing == ["b"]


def test_validation_refuses_nan_wrong_order_and_rows():
    dogscats = competition("dogscats")
    sample = pd.DataFrame({"id": ["1", "2"], "label": [0.5, 0.5]})
    good = pd.DataFrame({"id": ["1", "2"], "label": [0.2, 0.9]})
    validate_submission(good, sample, dogscats, renormalize=False)
    cases = {
        "rows with NaN": pd.DataFrame({"id": ["1", "2"], "label": [0.2, np.nan]}),
        "ids differ": pd.DataFrame({"id": ["2", "1"], "label": [0.2, 0.9]}),
        "1 rows, the sample has 2": pd.DataFrame({"id": ["1"], "label": [0.2]}),
        "outside [0, 1]": pd.DataFrame({"id": ["1", "2"], "label": [0.2, 1.5]}),
    }
    for expected, frame in cases.items():
        with pytest.raises(PipelineError, match=rf"nothing written: .*{expected}".replace("[", r"\[").replace("]", r"\]")):
            validate_submission(frame, sample, dogscats, renormalize=False)


def test_log_losses_match_sklearn_and_clipping_bounds_the_worst_case():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    labels = rng.integers(0, 4, size=50)
    assert multiclass_log_loss(labels, probs) == pytest.approx(log_loss(labels, probs, labels=range(4)))
    p = rng.uniform(0.01, 0.99, size=50)
    y = rng.integers(0, 2, size=50)
    assert binary_log_loss(y, p) == pytest.approx(log_loss(y, p))
    confident_wrong = np.array([[1.0, 0.0]])
    assert competition_score("binary", "log_loss", np.array([1]), confident_wrong) == pytest.approx(34.54, abs=0.01)
    clipped = clip_probabilities(confident_wrong, 0.05, 0.95)
    assert competition_score("binary", "log_loss", np.array([1]), clipped) == pytest.approx(-np.log(0.05))


def test_scoring_a_file_like_kaggle():
    statefarm = competition("statefarm")
    solution = pd.DataFrame({"img": ["a.jpg", "b.jpg"], "classname": ["c1", "c9"], "subject": ["p1", "p2"]})
    probs = np.full((2, 10), 0.05)
    probs[0, 9], probs[1, 1] = 0.55, 0.55  # row 0 is b.jpg (c9), row 1 is a.jpg (c1)
    frame = submission_frame(["b.jpg", "a.jpg"], probs, statefarm, renormalize=False).astype(str)
    assert score_submission(frame, solution, statefarm) == pytest.approx(-np.log(0.55))
    with pytest.raises(PipelineError, match="1 missing"):
        score_submission(frame.iloc[:1], solution, statefarm)
    with pytest.raises(PipelineError, match="duplicate ids"):
        score_submission(pd.concat([frame, frame.iloc[:1]]), solution, statefarm)
    with pytest.raises(PipelineError, match="wrong header"):
        score_submission(frame.rename(columns={"c0": "class0"}), solution, statefarm)
    digits = competition("digits")
    answers = pd.DataFrame({"ImageId": ["1", "2"], "Label": ["3", "4"]})
    assert score_submission(pd.DataFrame({"ImageId": ["2", "1"], "Label": ["4", "0"]}), answers, digits) == 0.5


def test_evaluate_names_every_score_once_and_clips_as_submitted():
    dogscats, statefarm = competition("dogscats"), competition("statefarm")
    labels = np.array([1, 0, 1])
    probs = np.array([[0.01, 0.99], [0.6, 0.4], [0.999, 0.001]])  # the last: a confident miss
    plain = evaluate(labels, probs)
    assert set(plain) == {"val_log_loss", "val_accuracy"}
    assert plain["val_log_loss"] == pytest.approx(log_loss(labels, probs), abs=1e-5)
    assert plain["val_accuracy"] == pytest.approx(2 / 3, abs=1e-5)
    scores = evaluate(labels, probs, dogscats, clip=True)
    assert tuple(sorted(scores)) == tuple(sorted(SCORE_NAMES))
    clipped = np.clip(probs[:, 1], *dogscats.clip)  # binary: P(dog) alone, as the submission holds it
    assert scores["val_log_loss_clipped"] == pytest.approx(log_loss(labels, np.c_[1 - clipped, clipped]), abs=1e-5)
    assert scores["val_log_loss_clipped"] < scores["val_log_loss"]  # clipping caps the confident miss
    assert score_for(dogscats.metric).submitted == "val_log_loss_clipped"
    assert score_for("accuracy").submitted == "val_accuracy" and statefarm.metric == "log_loss"
