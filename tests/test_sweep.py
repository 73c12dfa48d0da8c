"""kp sweep and kp runs: a grid of trials on the run cache (a repeated trial trains nothing), every stored run
side by side with the settings that differ, and the best run's overlay."""
from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.engine.config import load_config
from pipeline.experiments.sweeps import grid_trials, split_values
from tests.test_cv import CV, _cross_validated


def _options(sets):
    return [arg for assignment in sets for arg in ("--set", assignment)]


def test_grid_values_split_outside_brackets_and_combine_in_order():
    assert split_values("[16, 16],[32],0.5") == ["[16, 16]", "[32]", "0.5"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert grid_trials(["model.hidden=[8],[16, 16]", "cv.seed=0,1"]) == [
        {"model.hidden": "[8]", "cv.seed": "0"}, {"model.hidden": "[8]", "cv.seed": "1"},
        {"model.hidden": "[16, 16]", "cv.seed": "0"}, {"model.hidden": "[16, 16]", "cv.seed": "1"}]
    with pytest.raises(PipelineError, match="an empty value"):
        split_values("1,,2")
    with pytest.raises(PipelineError, match="given twice"):
        grid_trials(["cv.seed=0", "cv.seed=1"])


def test_a_sweep_reuses_the_cache_lists_its_runs_and_gives_the_best_overlay(warm_project):
    root = warm_project("cv", _cross_validated)
    runner = CliRunner()
    result = runner.invoke(cli, ["sweep", "--comp", "synth", *_options(CV), "--grid", "cv.seed=0,1", "--name", "seeds"])
    assert result.exit_code == 0, result.output
    folder = root / "work" / "synth" / "sweeps" / "seeds"
    trials = [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]
    assert [t["overrides"] for t in trials] == [{"cv.seed": "0"}, {"cv.seed": "1"}]
    assert trials[0]["ran"] == []  # the base run's trial: every result was stored already
    assert trials[1]["ran"] == ["cv"]  # only the folds of the new seed trained: features, split restored or skipped
    assert trials[1]["command"].startswith("kp cv --comp synth ") and trials[1]["command"].endswith("--set cv.seed=1")
    for trial in trials:  # each score is its own cv run's
        run = Manifest.read(root / "work" / "synth" / "_runs" / "cv" / trial["fingerprint"])
        assert trial["val_log_loss"] == run.metrics["val_log_loss"] and trial["validation"] == "cv4-oof"

    again = runner.invoke(cli, ["sweep", "--comp", "synth", *_options(CV), "--grid", "cv.seed=0,1", "--name", "seeds"])
    assert again.exit_code == 0, again.output
    assert all(json.loads(line)["ran"] == [] for line in (folder / "trials.jsonl").read_text().splitlines())

    listed = runner.invoke(cli, ["runs", "--comp", "synth", *_options(CV), "--stage", "cv", "--json"])
    rows = json.loads(listed.stdout)
    assert {row["fingerprint"] for row in rows} == {t["fingerprint"] for t in trials}
    differs = {row["fingerprint"]: row["differs"] for row in rows}
    assert differs[trials[0]["fingerprint"]] == {} and differs[trials[1]["fingerprint"]] == {"cv.seed": 1}

    swept = runner.invoke(cli, ["runs", "--comp", "synth", *_options(CV), "--sweep", "seeds", "--plot", "--json"])
    assert swept.exit_code == 0, swept.output
    assert sorted(row["fingerprint"] for row in json.loads(swept.stdout)) == sorted(t["fingerprint"] for t in trials)
    assert (folder / "sweep.png").stat().st_size > 0
    from pipeline.experiments.report import build_report

    html = build_report(load_config("synth", sets=CV)).read_text()
    assert "seeds: 2 trials of cv" in html and "cv.seed=1" in html
    unknown = runner.invoke(cli, ["runs", "--comp", "synth", *_options(CV), "--sweep", "nope"])
    assert unknown.exit_code == 2 and "no such sweep" in unknown.output and "seeds" in unknown.output

    best = runner.invoke(cli, ["runs", "--comp", "synth", *_options(CV), "--stage", "cv", "--best", "--apply",
                               str(root / "best.yaml")])
    assert best.exit_code == 0, best.output
    winner = min(trials, key=lambda t: t["val_log_loss"])
    overlay = yaml.safe_load((root / "best.yaml").read_text())
    assert overlay == ({} if winner["overrides"] == {"cv.seed": "0"} else {"cv": {"seed": 1}})
    reproduced = load_config("synth", extra_files=[root / "best.yaml"], sets=CV)
    from pipeline.engine.status import expected_fingerprints

    assert expected_fingerprints(reproduced)["cv"] == winner["fingerprint"]  # the overlay reruns the best run


def test_a_search_space_file_is_checked_and_names_the_key(tmp_path):
    from pipeline.experiments.sweeps import read_space

    path = tmp_path / "space.yaml"
    path.write_text("model.l2: {low: 0.0001, high: 0.01, log: true}\nmodel.hidden: {choices: [[], [128]]}\n")
    space = read_space(path)
    assert space["model.l2"].log and space["model.hidden"].choices == [[], [128]]
    path.write_text("model.l2: {low: 0.01, high: 0.001}\n")
    with pytest.raises(PipelineError, match=r"space.yaml: model.l2: .*low 0.01 must be below high 0.001"):
        read_space(path)
    path.write_text("cv.seed: {low: 0}\n")
    with pytest.raises(PipelineError, match="cv.seed: .*either low and high"):
        read_space(path)


@pytest.mark.slow  # three trials, one killed mid-training (about a minute)
def test_a_sweep_killed_mid_trial_reruns_only_what_was_missing(warm_project):
    import time

    from tests.helpers import start_kp

    root = warm_project("cv", _cross_validated)
    args = ["sweep", "--comp", "synth", *_options(CV), "--grid", "cv.seed=0,2,3", "--name", "killed"]
    trials_file = root / "work" / "synth" / "sweeps" / "killed" / "trials.jsonl"
    process = start_kp(root, *args)
    deadline = time.monotonic() + 300
    while not (trials_file.exists() and len(trials_file.read_text().splitlines()) >= 2):  # trial 3 is training
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
        time.sleep(0.05)
    time.sleep(1.0)
    process.kill()
    process.wait()
    assert len(trials_file.read_text().splitlines()) == 2
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    trials = [json.loads(line) for line in trials_file.read_text().splitlines()]
    assert [t["ran"] for t in trials] == [[], [], ["cv"]]  # the finished trials restored; only the killed one trained
    folds = root / "work" / "synth" / "_runs" / "cv-folds"
    assert not [p.name for p in folds.iterdir() if p.name.startswith(".tmp-")]  # the killed fold's leftovers swept


def test_the_pruning_rule_stops_only_a_trial_worse_on_each_fold_by_the_margin():
    from pipeline.experiments.trials import Pruning, best_folds, prune_reason

    best = {1: 0.50, 2: 0.40, 3: 0.60, 4: 0.55}
    rule = Pruning(after=2, margin=0.05)
    assert prune_reason("val_log_loss", {1: 0.60}, best, 4, rule) is None  # one fold is not enough
    why = prune_reason("val_log_loss", {1: 0.60, 2: 0.45}, best, 4, rule)
    assert why.startswith("stopped after 2 of 4 folds: on folds 1, 2") and "0.5250 against the best trial's 0.4500" in why
    assert prune_reason("val_log_loss", {1: 0.90, 2: 0.39}, best, 4, rule) is None  # better on one fold
    assert prune_reason("val_log_loss", {1: 0.51, 2: 0.41}, best, 4, rule) is None  # worse on each, within the margin
    assert prune_reason("val_log_loss", {1: 0.6, 2: 0.5}, best, 4, None) is None  # pruning off
    assert prune_reason("val_log_loss", {1: 0.6, 2: 0.5, 3: 0.7, 4: 0.6}, best, 4, rule) is None  # finished anyway
    assert prune_reason("val_accuracy", {1: 0.80, 2: 0.85}, {1: 0.90, 2: 0.90, 3: 0.9}, 3, rule) is not None  # errors
    records = [{"val_log_loss": 0.5, "fold_scores": {"1": 0.5}}, {"val_log_loss": 0.4, "fold_scores": {"1": 0.4}},
               {"val_log_loss": None, "pruned": "...", "fold_scores": {"1": 0.1}}]
    assert best_folds("val_log_loss", records) == {1: 0.4}  # a stopped trial is never the best


def test_an_optuna_study_drives_the_same_rule_through_its_pruner():
    """FoldPruner: the study prunes a trial that reports folds each worse than the best completed trial's,
    by the rule's margin, once two are in; the judge a search gives a trial reports each fold once."""
    import optuna

    from pipeline.experiments.pruning import FoldPruner, study_judge
    from pipeline.experiments.trials import Pruning

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = FoldPruner("val_log_loss", 4, Pruning(after=2, margin=0.05))
    study = optuna.create_study(direction="minimize", pruner=pruner)
    for scores in ({1: 0.50, 2: 0.40, 3: 0.60, 4: 0.55}, {1: 0.70, 2: 0.70, 3: 0.70, 4: 0.70}):
        done = study.ask()
        for fold, score in scores.items():
            done.report(score, fold)
        study.tell(done, sum(scores.values()) / 4)
    worse, close = study.ask(), study.ask()
    judge = study_judge(worse, pruner)
    assert judge({1: 0.60}) is None  # one fold is not enough
    why = judge({1: 0.60, 2: 0.45})
    assert why.startswith("stopped after 2 of 4 folds") and "against the best trial's 0.4500" in why
    assert judge.reported == {1, 2}
    assert study_judge(close, pruner)({1: 0.51, 2: 0.41}) is None  # within the margin of the best (not the worst)


GOOD, BAD = "[{epochs: 2, lr: 0.001}, {epochs: 1, lr: 0.0001}]", "[{epochs: 3, lr: 3.0}]"  # base's; diverging


def test_a_trial_clearly_worse_on_its_first_folds_stops_and_its_folds_are_kept(warm_project):
    root = warm_project("cv", _cross_validated)
    runner = CliRunner()
    args = ["sweep", "--comp", "synth", *_options(CV), "--grid", f"finetune.phases={GOOD},{BAD}", "--name", "pruned"]
    result = runner.invoke(cli, [*args, "--prune"])
    assert result.exit_code == 0, result.output
    assert "2 trials of cv (val_log_loss; 1 stopped early)" in result.output
    trials_file = root / "work" / "synth" / "sweeps" / "pruned" / "trials.jsonl"
    good, bad = [json.loads(line) for line in trials_file.read_text().splitlines()]
    assert "pruned" not in good and good["val_log_loss"] < 1.2
    assert bad["pruned"].startswith("stopped after 2 of 4 folds") and bad["val_log_loss"] is None
    assert {int(f) for f in bad["fold_scores"]} == {1, 2} and all(bad["fold_scores"][f] > good["fold_scores"][f]
                                                                    for f in ("1", "2"))
    assert not (root / "work" / "synth" / "_runs" / "cv" / bad["fingerprint"]).exists()  # no cv result written
    listed = runner.invoke(cli, ["runs", "--comp", "synth", *_options(CV), "--sweep", "pruned"])
    assert "trials stopped early (no result to list): 2;" in listed.output

    finished = runner.invoke(cli, [*args, "--no-prune"])  # the stopped trial's two folds are kept
    assert finished.exit_code == 0, finished.output
    bad = [json.loads(line) for line in trials_file.read_text().splitlines()][1]
    assert bad["val_log_loss"] > good["val_log_loss"] and "pruned" not in bad
    assert Manifest.read(root / "work" / "synth" / "_runs" / "cv" / bad["fingerprint"]).metrics["trained"] == 2


def test_an_optuna_search_stores_its_study_prunes_a_worse_trial_and_raising_trials_adds_to_it(warm_project):
    import optuna

    root = warm_project("cv", _cross_validated)
    space = root / "space.yaml"
    space.write_text(f"finetune.phases: {{choices: [{GOOD}, {BAD}]}}\n")
    runner = CliRunner()
    args = ["sweep", "--comp", "synth", *_options(CV), "--search", str(space), "--seed", "6", "--name", "search"]
    result = runner.invoke(cli, [*args, "--trials", "3"])  # two combinations: each once, in order
    assert result.exit_code == 0, result.output
    assert "the space holds 2 combinations (0 ran before): running each once and stopping there" in result.output
    folder = root / "work" / "synth" / "sweeps" / "search"
    trials = [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]
    assert [t["overrides"]["finetune.phases"] for t in trials] == [GOOD, BAD]
    assert [t["ran"] for t in trials] == [[], ["cv"]]  # the base's setting restored, not trained again
    assert trials[0]["val_log_loss"] == Manifest.read(root / "work" / "synth" / "_runs" / "cv" /
                                                      trials[0]["fingerprint"]).metrics["val_log_loss"]
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{folder / 'study.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    for trial in study.trials:  # each fold's score, reported at its fold number
        assert trial.intermediate_values == {int(f): v for f, v in trial.user_attrs["record"]["fold_scores"].items()}
    assert len(study.trials[1].intermediate_values) == 2 and len(study.trials[0].intermediate_values) == 4
    assert "nothing to run" in runner.invoke(cli, [*args, "--trials", "4"]).output  # the space is used up

    space.write_text("kaggle.poll_every_s: {low: 1.0, high: 10.0}\n")  # continuous (and no stage reads it)
    args[-1] = "open"
    assert runner.invoke(cli, [*args, "--trials", "2"]).exit_code == 0
    more = runner.invoke(cli, [*args, "--trials", "3"])
    assert more.exit_code == 0, more.output
    assert len((folder.with_name("open") / "trials.jsonl").read_text().splitlines()) == 3  # one more, two kept
    assert "nothing to run" in runner.invoke(cli, [*args, "--trials", "3"]).output


def test_every_trials_settings_are_checked_before_the_first_trial_runs(project):
    runner = CliRunner()
    typo = runner.invoke(cli, ["sweep", "--comp", "digits", "--grid", "model.l2=0,0.001", "--grid", "model.hiden=[8]"])
    assert typo.exit_code == 2 and "unknown key 'model.hiden'" in typo.output and "did you mean 'hidden'" in typo.output
    space = project / "space.yaml"
    space.write_text("model.l2: {low: -0.01, high: 0.01}\n")  # the low end is out of range
    bad = runner.invoke(cli, ["sweep", "--comp", "digits", "--search", str(space), "--trials", "2"])
    assert bad.exit_code == 2 and "model.l2" in bad.output and "greater than or equal to 0" in bad.output
    assert not (project / "work" / "digits").exists()  # nothing ran, nothing was written

    missing = project / "no-such-download.zip"  # a first sweep claims the fresh work folder, as any kp run does
    first = runner.invoke(cli, ["sweep", "--comp", "digits", "--set", f"download.source={missing}",
                                "--grid", "model.l2=0,0.001", "--name", "first"])
    assert first.exit_code == 2 and "stage download failed" in first.output and str(missing) in first.output
    assert (project / "work" / "digits" / ".kp-work").is_file()
    assert (project / "work" / "digits" / "sweeps" / "first" / "sweep.json").is_file()


def test_a_grid_past_the_trial_limit_is_refused_at_once_and_a_finite_space_stops_when_used_up(warm_project):
    import time

    root = warm_project("cv", _cross_validated)
    runner = CliRunner()
    hundred = ",".join(str(n) for n in range(1, 101))
    started = time.monotonic()
    big = runner.invoke(cli, ["sweep", "--comp", "synth", *_options(CV), "--grid", f"cv.seed={hundred}",
                              "--grid", f"finetune.batch_size={hundred}"])
    assert big.exit_code == 2 and "--grid: 100 x 100 = 10,000 combinations, more than sweep.max_trials=1,000" \
        in big.output, big.output
    assert time.monotonic() - started < 20  # refused before a trial's config is built

    space = root / "space.yaml"  # three settings cv does not read: every trial restores the current cv
    space.write_text("kaggle.poll_every_s: {choices: [1, 2, 3]}\n")
    args = ["sweep", "--comp", "synth", *_options(CV), "--search", str(space), "--name", "small"]
    result = runner.invoke(cli, [*args, "--trials", "1000000000000"])
    assert result.exit_code == 0, result.output
    assert "the space holds 3 combinations (0 ran before): running each once and stopping there" in result.output
    trials = [json.loads(line) for line in (root / "work" / "synth" / "sweeps" / "small" / "trials.jsonl").open()]
    assert sorted(t["overrides"]["kaggle.poll_every_s"] for t in trials) == ["1", "2", "3"]
    assert "nothing to run" in runner.invoke(cli, [*args, "--trials", "5"]).output
    space.with_name("range.yaml").write_text("model.l2: {low: 0.0001, high: 0.01, log: true}\n")  # continuous
    too_many = runner.invoke(cli, ["sweep", "--comp", "synth", *_options(CV), "--search",
                                   str(space.with_name("range.yaml")), "--trials", "5000"])
    assert too_many.exit_code == 2 and "--trials 5,000: more than sweep.max_trials=1,000" in too_many.output


def test_a_space_with_a_log_range_from_zero_or_a_step_past_its_range_names_the_key(tmp_path):
    from pipeline.experiments.sweeps import read_space

    path = tmp_path / "space.yaml"
    path.write_text("model.l2: {low: 0, high: 0.01, log: true}\n")
    with pytest.raises(PipelineError, match=r"space.yaml: model.l2: .*log: true needs low above 0"):
        read_space(path)
    path.write_text("finetune.batch_size: {low: 8, high: 64, step: 128}\n")
    with pytest.raises(PipelineError, match=r"finetune.batch_size: .*step 128 must be above 0 and at most high - low"):
        read_space(path)


def test_a_damaged_study_or_trials_file_is_one_line_and_no_record_is_dropped(warm_project):
    root = warm_project("cv", _cross_validated)
    space = root / "space.yaml"
    space.write_text("kaggle.poll_every_s: {low: 1.0, high: 10.0}\n")  # no stage reads it: each trial restores cv
    runner = CliRunner()
    args = ["sweep", "--comp", "synth", *_options(CV), "--search", str(space), "--name", "kept", "--trials", "2"]
    assert runner.invoke(cli, args).exit_code == 0
    other = ["sweep", "--comp", "synth", *_options(CV), "--grid", "kaggle.poll_every_s=3,4", "--name", "other"]
    assert runner.invoke(cli, other).exit_code == 0
    folder = root / "work" / "synth" / "sweeps" / "kept"
    trials = (folder / "trials.jsonl").read_text()
    study = (folder / "study.db").read_bytes()

    for damage in (study[:len(study) // 3], b"not a database at all" * 50, b""):  # truncated, garbage, emptied
        (folder / "study.db").write_bytes(damage)
        result = runner.invoke(cli, [*args[:-1], "3"])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"{folder / 'study.db'}: " in result.output and "to start this search afresh" in result.output
        assert (folder / "trials.jsonl").read_text() == trials  # no record dropped

    (folder / "trials.jsonl").write_text(trials + "{half a line\n")
    runs = ["runs", "--comp", "synth", *_options(CV)]
    result = runner.invoke(cli, [*runs, "--sweep", "kept"])
    assert result.exit_code == 2 and f"{folder / 'trials.jsonl'}: line 3: not JSON" in result.output
    assert runner.invoke(cli, [*runs, "--sweep", "other"]).exit_code == 0  # that sweep only: the other still reads
    report = runner.invoke(cli, ["report", "--comp", "synth", *_options(CV)])
    assert report.exit_code == 0, report.output
    html = (root / "work" / "synth" / "report.html").read_text()
    assert "left out: " in html and "line 3: not JSON" in html and "other: 2 trials" in html
