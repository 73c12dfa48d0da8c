"""The learning-rate range test: its suggestion lands near a rate known to be good, and it changes
nothing that a stage wrote."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.engine.config import load_config
from pipeline.engine.status import UP_TO_DATE, stage_statuses
from pipeline.models.heads import build_head
from pipeline.training.fit import make_optimizer
from pipeline.training.lr_find import Ramp, range_test
from tests.helpers import make_statefarm_like, png_size, statefarm_like_config
from tests.test_transfer import TINY_VGG


def _problem(seed=0, n=2000):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 20)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(20, 3)) + rng.normal(scale=0.5, size=(n, 3)), axis=1)
    return x, y


def _head():
    keras.utils.set_random_seed(0)
    return build_head((20,), 3, "pool", [32], [0.0])


@pytest.mark.slow  # 8-14 s (2026-12-06): trains at each of several rates; the fast tier keeps kp lr-find's own test
def test_the_suggestion_is_within_10x_of_the_best_rate_found_by_training_at_each():
    x, y = _problem()
    model = _head()
    before = [w.copy() for w in model.get_weights()]
    test = range_test(model, x, y, optimizer="adam", ramp=Ramp(steps=200), batch_size=32)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # a copy was trained
    assert test.diverged and len(test.rates) < 200 and test.rates[0] == 1e-7
    # the rate that really trains best: one epoch at each, scored on held-out rows
    scores = {}
    for rate in (1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0):
        trial = _head()
        trial.compile(optimizer=make_optimizer("adam", rate), loss="sparse_categorical_crossentropy")
        trial.fit(x[:1500], y[:1500], batch_size=32, epochs=1, verbose=0)
        scores[rate] = trial.evaluate(x[1500:], y[1500:], verbose=0)
    best = min(scores, key=scores.get)
    for name, rate in test.suggestions().items():
        assert best / 10 <= rate <= best * 10, (name, rate, best, scores)


def test_kp_lr_find_writes_its_plot_and_overlay_and_leaves_the_stages_as_they_were(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=4)
    statefarm_like_config(project, archive)
    sets = [arg for s in TINY_VGG for arg in ("--set", s)]
    assert CliRunner().invoke(cli, ["all", "--comp", "synth", *sets], catch_exceptions=False).exit_code == 0
    config = load_config("synth", sets=TINY_VGG)
    model_file = config.work_dir / "finetune" / "model.keras"
    before = model_file.read_bytes()
    result = CliRunner().invoke(cli, ["lr-find", "--comp", "synth", *sets, "--steps", "40", "--apply"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "minimum / 10 =" in result.output and "overlay:" in result.output
    out = config.work_dir / "lr_find" / "finetune"
    assert png_size(out / "lr_find.png") == (700, 400)
    overlay = yaml.safe_load((out / "overlay.yaml").read_text())
    record = json.loads((out / "lr_find.json").read_text())
    first, second = overlay["finetune"]["phases"]
    assert first["lr"] == float(f"{record['suggestions']['minimum_over_10']:.3g}")
    assert second["lr"] / first["lr"] == pytest.approx(0.1, rel=0.01)  # TINY_VGG's 1e-3 then 1e-4
    assert model_file.read_bytes() == before
    assert all(s.state == UP_TO_DATE for s in stage_statuses(config))
    unphased = [s for s in TINY_VGG if not s.startswith("finetune.phases")]
    with_overlay = load_config("synth", extra_files=[out / "overlay.yaml"], sets=unphased)
    assert with_overlay.section("finetune").phases[0].lr == first["lr"]
    edited = "# my own rates\nfinetune:\n  phases: [{epochs: 3, lr: 0.01}]\n"
    (out / "overlay.yaml").write_text(edited)  # the overlay edited by hand: the next --apply keeps it
    again = CliRunner().invoke(cli, ["lr-find", "--comp", "synth", *sets, "--steps", "40", "--apply"])
    assert again.exit_code == 2 and f"{out / 'overlay.yaml'}: kp did not write it" in again.output
    assert (out / "overlay.yaml").read_text() == edited

    # bnretrain's recipe: finetune's trained head with batchnorm inserted, its own rate
    batchnorm = [s.replace("finetune, submit", "finetune, bnretrain, submit") for s in TINY_VGG]
    result = CliRunner().invoke(cli, ["lr-find", "--comp", "synth", "--stage", "bnretrain", "--steps", "20",
                                      *[arg for s in batchnorm for arg in ("--set", s)]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((config.work_dir / "lr_find" / "bnretrain" / "lr_find.json").read_text())
    assert record["stage"] == "bnretrain" and record["current_lr"] == 1e-4 and record["batches"] >= 10
    assert model_file.read_bytes() == before
