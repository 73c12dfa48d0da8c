"""Validation-set design: stratified random, whole-group (driver) and k-fold splits."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pandas as pd
import pytest

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.data.splits import class_balance, group_kfold, group_split, kfold, random_split
from pipeline.engine import runner
from pipeline.engine.config import load_config
from tests.helpers import COMPETITIONS, make_statefarm_like, needs_shared_data, statefarm_like_config

STATEFARM_ZIP = COMPETITIONS / "state-farm-distracted-driver-detection" / "state-farm-distracted-driver-detection.zip"


@pytest.fixture(scope="module")
def drivers() -> pd.DataFrame:
    """The real driver_imgs_list.csv (14,349 images of 16 drivers), read straight from the archive."""
    if not STATEFARM_ZIP.is_file():
        pytest.skip(f"real data {STATEFARM_ZIP} is absent")
    with zipfile.ZipFile(STATEFARM_ZIP) as zf:
        return pd.read_csv(io.BytesIO(zf.read("driver_imgs_list.csv")))


@needs_shared_data
@pytest.mark.realdata
@pytest.mark.parametrize("seed", [0, 42])
def test_group_split_on_real_drivers_keeps_each_driver_on_one_side(drivers, seed):
    labels, groups = drivers.classname.to_numpy(), drivers.subject.to_numpy()
    folds = group_split(labels, groups, fraction=0.2, seed=seed)
    valid = folds == 0
    assert not set(groups[valid]) & set(groups[~valid])
    assert 2 <= len(set(groups[valid])) <= 5
    assert abs(valid.mean() - 0.2) < 0.03
    assert class_balance(labels, valid) < 0.03
    assert np.array_equal(folds, group_split(labels, groups, fraction=0.2, seed=seed))  # reproducible


@needs_shared_data
@pytest.mark.realdata
def test_group_kfold_on_real_drivers(drivers):
    labels, groups = drivers.classname.to_numpy(), drivers.subject.to_numpy()
    folds = group_kfold(labels, groups, k=4, seed=1)
    assert sorted(np.unique(folds)) == [0, 1, 2, 3]
    for driver in np.unique(groups):
        assert len(np.unique(folds[groups == driver])) == 1


def test_random_split_is_stratified_and_reproducible():
    labels = np.repeat(np.array(["a", "b", "c"]), [100, 50, 30])
    folds = random_split(labels, fraction=0.2, seed=3)
    for label, n in [("a", 100), ("b", 50), ("c", 30)]:
        assert abs((folds[labels == label] == 0).sum() - 0.2 * n) <= 1
    assert np.array_equal(folds, random_split(labels, fraction=0.2, seed=3))
    assert not np.array_equal(folds, random_split(labels, fraction=0.2, seed=4))


def test_kfold_puts_every_row_in_exactly_one_fold():
    labels = np.repeat(np.array(["a", "b"]), [60, 40])
    folds = kfold(labels, k=5, seed=0)
    assert np.bincount(folds).tolist() == [20] * 5


def test_group_split_needs_two_groups():
    with pytest.raises(ValueError, match="at least 2 groups"):
        group_split(np.array(["a", "b"]), np.array(["g", "g"]), 0.5, 0)


def test_split_stage_writes_aligned_split_and_report(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=6, classes=3, per_driver_class=4)
    statefarm_like_config(project, archive)
    config = load_config("synth")
    runner.run(config)
    index = pd.read_csv(config.work_dir / "download" / "index.csv", dtype=str, keep_default_na=False)
    split = pd.read_csv(config.work_dir / "split" / "split.csv", dtype={"id": str})
    train = index[index.subset == "train"]
    assert split.id.tolist() == train.id.tolist()  # aligned row for row with the index
    report = Manifest.read(config.work_dir / "split").metrics
    assert report["groups_on_both_sides"] == []
    assert report["n_valid"] == (split.side == "valid").sum() == 24  # 2 of 6 drivers
    assert report["per_class"]["valid"] == {"c0": 8, "c1": 8, "c2": 8}


def test_random_split_on_grouped_data_warns(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, archive)
    config = load_config("synth", sets=["split.strategy=random"])
    runner.run(config)
    manifest = Manifest.read(config.work_dir / "split")
    assert any("random split on data with 6 groups" in w for w in manifest.warnings)
    assert manifest.metrics["groups_on_both_sides"]  # and it shows: drivers on both sides


def test_group_strategy_without_groups_is_an_error(project):
    with pytest.raises(PipelineError, match="needs a group for every training row"):
        runner.run(load_config("digits", sets=["split.strategy=group_kfold"]), ["split"])


def test_kfold_strategy_uses_the_configured_valid_fold(project):
    config = load_config("digits", sets=["split.strategy=kfold", "split.folds=4", "split.valid_fold=2"])
    runner.run(config, ["split"])
    split = pd.read_csv(config.work_dir / "split" / "split.csv")
    assert sorted(split.fold.unique()) == [0, 1, 2, 3]
    assert ((split.fold == 2) == (split.side == "valid")).all()
