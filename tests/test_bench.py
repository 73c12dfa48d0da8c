"""Every benchmark in bench/ runs on a tiny input and writes its result, so a renamed artifact or a
changed API cannot break one silently. Each runs in this process (`runpy`), on a throwaway project
($KP_ROOT), which is where it writes `bench/results/`; no time is asserted."""
from __future__ import annotations

import json
import runpy
import sys

import pytest

from pipeline.engine import runner
from pipeline.engine.config import load_config
from tests.helpers import REPO, make_statefarm_like, needs_shared_data, statefarm_like_config
from tests.test_augment import AUGMENTED

CHEAP = ["finetune.phases=[{epochs: 1, lr: 0.001}]", "ensemble.n=1"]


def _digits(root):
    runner.run(load_config("digits", sets=CHEAP))


def _augmented(root):
    archive = make_statefarm_like(root.parent / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(root, archive)
    runner.run(load_config("synth", sets=AUGMENTED), ["split", "augment"])


def run_bench(name: str, *args: str) -> None:
    argv = sys.argv
    sys.argv = [str(REPO / "bench" / name), *args]
    try:
        runpy.run_path(str(REPO / "bench" / name), run_name="__main__")
    finally:
        sys.argv = argv


def result(root, name: str) -> dict:
    return json.loads((root / "bench" / "results" / name).read_text())


def _sets(sets: list[str]) -> list[str]:
    return [arg for s in sets for arg in ("--set", s)]


def test_score_test_scores_the_submission_on_the_hidden_labels(warm_project):
    root = warm_project("bench-digits", _digits)
    run_bench("score_test.py", "--comp", "digits", *_sets(CHEAP))
    scored = result(root, "score_digits_random.json")
    assert scored["metric"] == "accuracy" and scored["source"] == "ensemble" and 0 < scored["test_score"] <= 1


def test_the_ladders_run_their_first_rungs(warm_project):
    root = warm_project("bench-digits", _digits)
    run_bench("transfer_ladder.py", "--comp", "digits", "--rungs", "1", *_sets(CHEAP))
    [rung] = result(root, "ladder_digits.json")["rows"]
    assert rung["source"] == "finetune" and 0 < rung["test_score"] <= 1
    run_bench("mnist_ladder.py", "--comp", "digits", "--config", str(REPO / "configs" / "digits.yaml"), "--rungs", "1",
              *_sets(CHEAP))
    rows = result(root, "digits_ladder.json")["rows"]
    assert [r["step"] for r in rows] == ["linear", "ensemble of 1"] and 0 < rows[-1]["test_accuracy"] <= 1


def test_finetune_modes_compares_two_variants(warm_project):
    root = warm_project("bench-digits", _digits)
    run_bench("finetune_modes.py", "--comp", "digits", "--vary", "steps", "--repeats", "1", *_sets(CHEAP))
    modes = result(root, "finetune_steps_digits.json")
    assert modes["variants_identical"] is True and modes["32"]["identical_over_repeats"]


def test_augment_speed_measures_passes_and_training(warm_project):
    root = warm_project("bench-augmented", _augmented)
    run_bench("augment_speed.py", "--comp", "synth", "--images", "8", "--repeats", "1", *_sets(AUGMENTED))
    speed = result(root, "augment_speed_synth.json")
    assert speed["throughput"]["ratio_augmented_plain"] > 0 and speed["training"]["passes"] == 3


def test_cli_startup_times_the_commands(warm_project):
    root = warm_project("bench-digits", _digits)
    run_bench("cli_startup.py", "--repeats", "1", "--only", "kp --help", "--only", "kp status --comp digits")
    assert [row["command"] for row in result(root, "cli_startup.json")["rows"]] == ["kp --help", "kp status --comp digits"]


@pytest.mark.slow
@pytest.mark.ray
def test_ray_speedup_runs_both_backends(warm_project):
    pytest.importorskip("ray", reason="Ray is not installed")
    root = warm_project("bench-augmented", _augmented)
    run_bench("ray_speedup.py", "--comp", "synth", "--repeats", "1", "--members", "1", "--shard-size", "16",
              *_sets([s for s in AUGMENTED if not s.startswith("stages=")]))
    assert set(result(root, "ray_speedup_synth.json")["medians"]) >= {"local"}


@pytest.mark.slow
@pytest.mark.realdata
@needs_shared_data
def test_transfer_measures_the_real_backbones(warm_project):
    root = warm_project("bench-digits", _digits)
    run_bench("transfer.py", "--vgg-images", "2", "--mobilenet-images", "8", "--repeats", "1")
    assert result(root, "transfer.json")["rows"]


@pytest.mark.slow
def test_scale_runs_every_stage_at_two_sizes_and_checks_its_limits(project):
    """bench/scale.py on two tiny competitions (its seven kp processes each import TensorFlow: about a minute)."""
    run_bench("scale.py", "--rows", "120,240", "--size", "64x48")
    measured = result(project, "scale.json")
    assert [row["n"] for row in measured["rows"]] == [120, 240]
    for row in measured["rows"]:
        assert set(row["stages"]) == {"download", "split", "precompute", "augment", "finetune", "smooth", "submit"}
        assert all(stage["seconds"] >= 0 and stage["peak_rss_mb"] > 0 for stage in row["stages"].values())
        assert row["disk_mb"] >= 0
    assert measured["limits"]["rss_limit_mb"] == 3000 and isinstance(measured["limits"]["rss_ok"], bool)
