"""Acceptance on the real mini-competitions: transfer learning with the real weights files (EfficientNet-Lite2
for dogs vs cats, MobileNetV2 for State Farm), the data
downloaded from and the submissions uploaded to the local Kaggle-compatible server by the real client.

Test labels are read here, as a benchmark would, through pipeline.evaluation.scoring; never by a stage.
"""
from __future__ import annotations

import pytest

from pipeline.core.cache import Manifest
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.scoring import score_file_on_test_set
from pipeline.kaggle import leaderboard
from pipeline.kaggle.ledger import read_ledger
from tests.helpers import COMPETITIONS, REPO, needs_shared_data

pytestmark = [needs_shared_data, pytest.mark.realdata]


def run_through_kaggle(project, comp: str, sets=(), overlays=()):
    """kp all with the committed configs/offline/COMP-kaggle.yaml (the weights path made absolute for the
    temporary project root) and `overlays` (names in configs/offline/), then kp submit --upload; the
    ledger row and the config."""
    files = [project / "configs" / "offline" / name for name in (f"{comp}-kaggle.yaml", *overlays)]
    weights = (REPO / load_config(comp, root=REPO, extra_files=files).get("precompute.weights")).resolve()
    config = load_config(comp, extra_files=files, sets=[f"precompute.weights={weights}", *sets])
    runner.run(config)
    row = leaderboard.upload(config, "acceptance test", say=lambda _: None)
    solution = COMPETITIONS / config.competition.slug / "solution.csv"
    test_score, test_accuracy = score_file_on_test_set(config, row["file"], solution)
    assert row["status"] == "complete" and float(row["lb_score"]) == pytest.approx(test_score, abs=1e-5)
    return config, row, test_accuracy


# The committed recipe (augmented passes, bnretrain, TTA, an ensemble of bnretrain members) with fewer
# passes and members, to keep `make test` short; bench/transfer_ladder.py measures the full one.
SHORT_RECIPE = ["augment.passes=2", "augment.test_passes=2", "ensemble.n=2"]
# The plain recipe (5-head ensembles on clean features) the ledger test was measured with.
PLAIN_RECIPE = ["stages=[download, split, precompute, finetune, ensemble, submit]", "finetune.augmented=false",
                "finetune.tta=false", "ensemble.source=finetune"]


@pytest.mark.slow  # about 3 minutes (Lite2 at 260 px, 2026-12-03): the heaviest real-data run, kept out of `make test`
def test_dogscats_transfer_features(project, kaggle_server):
    config, row, test_accuracy = run_through_kaggle(project, "dogscats", SHORT_RECIPE)
    finetune = Manifest.read(config.work_dir / "finetune").metrics
    assert finetune["train_passes"] == 2 and finetune["tta_passes"] == 2
    assert finetune["val_log_loss"] <= 0.20
    assert finetune["val_accuracy"] >= 0.91  # 0.971 measured (5 passes); a 210-image validation set
    ensemble = Manifest.read(config.work_dir / "ensemble").metrics
    assert ensemble["source"] == "bnretrain" and ensemble["val_log_loss"] <= 0.15  # 0.081 with 5 passes, 5 members
    assert test_accuracy >= 0.93 and float(row["lb_score"]) <= 0.15  # 0.081 with 5 passes, 5 members

    # batchnorm inserted into the trained head keeps every prediction on real features (the course's
    # Vgg16BN step, with gamma = sqrt(variance + epsilon) and beta = mean)
    import keras
    import numpy as np

    from pipeline.data.features import load_split_features
    from pipeline.models.batchnorm import with_batchnorm

    data = load_split_features(config.work_dir / "precompute", config.work_dir / "split", config.competition.classes)
    head = keras.models.load_model(config.work_dir / "finetune" / "model.keras")
    bn = with_batchnorm(head, data.x_train, dropout=0.0)
    np.testing.assert_allclose(bn.predict(data.x_valid, verbose=0), head.predict(data.x_valid, verbose=0), atol=1e-5)


@pytest.mark.slow
def test_statefarm_driver_split_predicts_the_leaderboard_better_than_a_random_split(project, kaggle_server):
    for strategy in ("group", "random"):
        config, _, _ = run_through_kaggle(project, "statefarm", [*PLAIN_RECIPE, f"split.strategy={strategy}"])
    rows = {r["split_strategy"]: r for r in read_ledger(config.submissions_dir / "ledger.csv")}
    gap = {strategy: abs(float(r["difference"])) for strategy, r in rows.items()}
    assert gap["group"] < gap["random"] / 2, rows  # measured with the 5-head ensembles: 0.47 vs 1.47
    assert (config.submissions_dir / "ledger.png").stat().st_size > 0


@pytest.mark.slow
def test_dogscats_cross_validated_smoothed_and_pseudo_labelled(project, kaggle_server):
    stages = "stages=[download, split, precompute, augment, cv, smooth, pseudo, submit]"  # pseudo too, not submitted
    config, row, test_accuracy = run_through_kaggle(project, "dogscats", [*SHORT_RECIPE[:2], stages],
                                                    ["dogscats-cv.yaml"])
    smooth = Manifest.read(config.work_dir / "smooth").metrics
    pseudo = Manifest.read(config.work_dir / "pseudo").metrics
    assert smooth["validation"] == "cv4-oof" and smooth["valid_sets"] == 7  # 1,400 rows in sets of the 200 test rows
    assert pseudo["validation"] == "cv4-oof" and pseudo["trained"] == 4
    assert pseudo["teacher_val_log_loss"] == smooth["val_log_loss"] <= 0.10  # 0.0625 measured with 5 passes
    assert pseudo["val_log_loss"] <= 0.10  # 0.0667 with 5 passes
    assert row["validation"] == "cv4-oof" and abs(float(row["difference"])) <= 0.05  # ledger: OOF vs leaderboard
    assert test_accuracy >= 0.95 and float(row["lb_score"]) <= 0.10  # 0.038 with 5 passes


@pytest.mark.parametrize("alpha", [0.35, 0.5])
def test_the_mobilenetv2_files_load_as_the_mobilenetv2_backbone(alpha):
    import numpy as np

    from pipeline.models.backbones import build_feature_model

    path = COMPETITIONS.parent / "weights" / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_224_no_top.h5"
    features = build_feature_model("mobilenetv2", str(path), (224, 224, 3), "pool", alpha)
    assert features.name == f"mobilenetv2_{alpha}" and features.model.output.shape[1:] == (1280,)
    images = features.preprocess(np.random.default_rng(0).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32))
    assert float(images.min()) >= -1 and float(images.max()) <= 1  # mobilenet_v2's own scaling
    assert np.isfinite(np.asarray(features.model(images))).all()


@pytest.mark.slow  # 4 min 31 s (2026-12-04): Lite2 features and one augmented pass, then six trials of 4-fold heads
def test_a_dogscats_grid_of_head_settings_reuses_the_features_and_a_rerun_trains_nothing(project):
    import json

    from click.testing import CliRunner

    from pipeline.cli.commands import cli

    files = [REPO / "configs" / "offline" / name for name in ("dogscats.yaml", "dogscats-cv.yaml")]
    absolute = load_config("dogscats", root=REPO, extra_files=files)
    sets = [f"download.source={absolute.path(absolute.get('download.source'))}",
            f"precompute.weights={absolute.path(absolute.get('precompute.weights'))}",
            "stages=[download, split, precompute, augment, cv]", "augment.passes=1", "augment.test_passes=1",
            "cv.source=finetune"]
    args = ["sweep", "--comp", "dogscats", *(a for f in files for a in ("--config", str(f))),
            *(a for s in sets for a in ("--set", s)), "--grid", "model.l2=0,0.0005,0.002",
            "--grid", "model.dropout=[0.25],[0.5]", "--name", "heads"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    trials_file = project / "work" / "dogscats" / "sweeps" / "heads" / "trials.jsonl"
    trials = [json.loads(line) for line in trials_file.read_text().splitlines()]
    assert len(trials) == 6 and set(trials[0]["ran"]) == {"download", "split", "precompute", "augment", "cv"}
    assert all(t["ran"] == ["cv"] for t in trials[1:])  # features and augmented passes computed once
    assert result.output.count("precompute: restored from the run cache") == 5
    assert all(t["validation"] == "cv4-oof" and t["val_log_loss"] < 0.1 for t in trials)  # 0.03-0.05 measured

    listed = CliRunner().invoke(cli, ["runs", *args[1:args.index("--grid")], "--sweep", "heads", "--json"])
    rows = json.loads(listed.stdout)
    assert sorted(row["val_log_loss"] for row in rows) == sorted(t["val_log_loss"] for t in trials)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "cv folds" not in again.output  # every trial restored: nothing trained
    assert all(json.loads(line)["ran"] == [] for line in trials_file.read_text().splitlines())
