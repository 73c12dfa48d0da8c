"""Neighbour smoothing: weight 0 is the identity, a row is never its own neighbour, test rows are smoothed
only with test rows, and a tuned setting is never chosen on the rows it is reported on."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.cache import Manifest
from pipeline.data.features import load_split_features
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.metrics import multiclass_log_loss
from pipeline.evaluation.predictions import load_predictions
from pipeline.evaluation.smoothing import (cross_fitted, halves, neighbours, neighbours_within, size_matched_sets,
                                           smooth)
from tests.helpers import make_statefarm_like, statefarm_like_config
from tests.test_transfer import TINY_VGG


def _clustered(n_per=20, clusters=4, classes=3, seed=0):
    """Features in tight clusters whose rows share a class, and noisy probabilities for them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, 8)) * 5
    which = np.repeat(np.arange(clusters), n_per)
    x = centres[which] + rng.normal(scale=0.1, size=(len(which), 8))
    labels = which % classes
    probs = np.full((len(which), classes), 0.2) + rng.uniform(0, 0.6, size=(len(which), classes))
    probs[np.arange(len(which)), labels] += 0.3
    return x, labels, (probs / probs.sum(axis=1, keepdims=True)).astype(np.float32), which


def test_weight_zero_is_the_identity_and_no_row_is_its_own_neighbour():
    x, _, probs, _ = _clustered()
    x[5] = x[6]  # an exact duplicate must not make a row its own neighbour either
    near = neighbours(x, 5, "cosine")
    assert near.index.shape == (len(x), 5)
    assert not (near.index == np.arange(len(x))[:, None]).any()
    assert 6 in near.index[5] and 5 in near.index[6]
    np.testing.assert_array_equal(smooth(probs, near, 5, 0.0), probs)
    blended = smooth(probs, near, 3, 1.0)
    np.testing.assert_allclose(blended[0], probs[near.index[0, :3]].mean(axis=0), rtol=1e-6)


def test_smoothing_within_clusters_lowers_the_log_loss():
    x, labels, probs, _ = _clustered()
    near = neighbours(x, 10, "euclidean")
    assert multiclass_log_loss(labels, smooth(probs, near, 10, 0.5)) < multiclass_log_loss(labels, probs)


def test_a_reported_rows_labels_never_choose_its_own_setting():
    x, labels, probs, which = _clustered(n_per=15, clusters=6)
    near = neighbours(x, 10, "cosine")
    side = halves(len(x), which.astype(str), seed=0)
    assert all(len(set(side[which == g])) == 1 for g in set(which)) and 0 < side.sum() < len(side)  # whole groups
    smoothed, choices = cross_fitted(probs, labels, near, [1, 5, 10], [0.0, 0.5, 1.0], False, side)
    scrambled = labels.copy()
    scrambled[~side] = (scrambled[~side] + 1) % 3  # change every label of one half ...
    again, _ = cross_fitted(probs, scrambled, near, [1, 5, 10], [0.0, 0.5, 1.0], False, side)
    np.testing.assert_array_equal(again[~side], smoothed[~side])  # ... and that half's smoothing is unchanged
    assert len(choices) == 2


SMOOTHED = [s.replace("finetune, submit", "finetune, smooth, submit") for s in TINY_VGG] + [
    "smooth.source=finetune", "smooth.tune=true", "smooth.grid={k: [1, 3], weight: [0.0, 0.5]}", "submit.source=smooth"]


@pytest.fixture
def smoothed_run(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive)
    config = load_config("synth", sets=SMOOTHED)
    runner.run(config)
    return config


def test_the_smooth_stage_smooths_test_rows_among_test_rows_and_submits(smoothed_run):
    work = smoothed_run.work_dir
    m = Manifest.read(work / "smooth").metrics
    assert m["halves_by"] == "group" and len(m["cross_fit_choices"]) == 2
    assert m["k"] in (1, 3) and m["weight"] in (0.0, 0.5)
    data = load_split_features(work / "precompute", work / "split", ["c0", "c1", "c2"])
    before, after = load_predictions(work / "finetune"), load_predictions(work / "smooth")
    expected = smooth(before.test_probs, neighbours(data.x_test, 3, "cosine"), m["k"], m["weight"])
    np.testing.assert_allclose(after.test_probs, expected, rtol=1e-6)  # neighbours from the test rows alone
    assert after.valid_ids == before.valid_ids and after.test_ids == before.test_ids
    submit = Manifest.read(work / "submit").metrics
    assert submit["source"] == "smooth"


def test_validation_rows_are_smoothed_within_sets_the_size_of_the_test_set():
    groups = np.repeat(np.array(list("abcdefgh")), [30, 25, 20, 20, 15, 10, 10, 10])
    sets = size_matched_sets(len(groups), 45, groups, seed=1)
    assert len(sets) == 3  # 140 rows / 45 test rows
    assert sorted(np.concatenate(sets).tolist()) == list(range(len(groups)))  # every row once
    assert all(not set(groups[rows]) & set(groups[np.setdiff1d(np.arange(len(groups)), rows)]) for rows in sets)
    assert max(map(len, sets)) - min(map(len, sets)) <= 15  # about equal: whole groups only
    random_sets = size_matched_sets(100, 30, None, seed=0)
    assert [len(rows) for rows in random_sets] == [34, 33, 33]
    x, _, _, _ = _clustered(n_per=25, clusters=4)
    near = neighbours_within(x, random_sets, 5, "cosine")
    for rows in random_sets:  # a row's neighbours all come from its own set, never itself
        assert np.isin(near.index[rows], rows).all()
        assert not (near.index[rows] == rows[:, None]).any()
