"""Looking at the data and the model: `kp show` (training images of every class with their labels and augmented
versions) and `top_losses.png` with the most confused classes (every predicting stage)."""
from __future__ import annotations

import numpy as np
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.cache import Manifest
from pipeline.data.augmentation import RowAugmenter
from pipeline.data.index import read_index
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.gallery import load_training_images, show_training_images
from pipeline.evaluation.mistakes import most_confused, top_losses
from pipeline.evaluation.predictions import load_predictions
from tests.helpers import make_statefarm_like, png_size, statefarm_like_config
from tests.test_transfer import TINY_VGG

FLIP = ["competition.image_size=[24, 32]", "augment.transforms=[{HorizontalFlip: {p: 0.5}}]", "augment.seed=3"]


def test_kp_show_draws_each_class_with_its_labels_and_augment_passes(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=3, classes=3, per_driver_class=2, test=2)
    statefarm_like_config(project, archive)
    result = CliRunner().invoke(cli, ["show", "--comp", "synth", "--per-class", "2",
                                      *[arg for s in FLIP for arg in ("--set", s)]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("train.png")
    config = load_config("synth", sets=FLIP)
    path, shown = show_training_images(config, per_class=2, augmented=True, passes=2)
    assert path.name == "train_augmented.png"  # one row per image: the image, then its 2 passes
    assert png_size(path) == (round(1.9 * 3 * 80), round(2.0 * len(shown) * 80))
    index = read_index(config.work_dir / "download" / "index.csv").query("subset == 'train'").reset_index(drop=True)
    assert [s["label"] for s in shown] == ["c0", "c0", "c1", "c1", "c2", "c2"]
    assert all(index["label"][s["row"]] == s["label"] and index["id"][s["row"]] == s["id"] for s in shown)
    images = load_training_images(config, config.work_dir / "download", index, [s["row"] for s in shown])
    assert images[0].shape == (24, 32, 3) and images[0].dtype == np.uint8
    # the versions are augment's own draws for those rows: pass k of row r is seeded by (seed, 0, k, r)
    flipped = [np.array_equal(RowAugmenter(config.get("augment.transforms"), (3, 0, 1))(image, s["row"]),
                              image[:, ::-1]) for image, s in zip(images, shown)]
    assert any(flipped) and not all(flipped)


def test_top_losses_are_the_rows_whose_true_class_got_the_least_probability():
    labels = np.array([0, 1, 2, 0, 1])
    probs = np.array([[0.9, 0.05, 0.05], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    assert top_losses(labels, probs, 3).tolist() == [1, 3, 4]  # p(true) 0.2, 0.2, 0.6
    assert most_confused(labels, probs.argmax(axis=1), ["a", "b", "c"]) == [
        {"true": "a", "predicted": "b", "count": 1}, {"true": "b", "predicted": "a", "count": 1}]


def test_every_predicting_stage_draws_its_worst_validation_rows(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=4)
    statefarm_like_config(project, archive)
    config = load_config("synth", sets=[s.replace("finetune, submit", "finetune, ensemble, submit") for s in TINY_VGG]
                         + ["ensemble.n=2"])
    runner.run(config)
    for stage in ("finetune", "ensemble"):
        m = Manifest.read(config.work_dir / stage).metrics
        predictions = load_predictions(config.work_dir / stage)
        true = predictions.valid_probs[np.arange(len(predictions.valid_ids)), predictions.valid_labels]
        worst = [predictions.valid_ids[i] for i in np.argsort(true, kind="stable")[:len(m["top_losses"])]]
        assert [row["id"] for row in m["top_losses"]] == worst
        assert m["top_losses"][0]["log_loss"] == round(float(-np.log(true.min())), 4)
        columns = min(4, len(m["top_losses"]))  # the listed rows, 4 to a line
        lines = -(-len(m["top_losses"]) // columns)
        assert png_size(config.work_dir / stage / "top_losses.png") == (round(2.6 * columns * 80), round(2.7 * lines * 80))
        wrong = int((predictions.valid_probs.argmax(axis=1) != predictions.valid_labels).sum())
        assert sum(pair["count"] for pair in m["most_confused"]) <= wrong
