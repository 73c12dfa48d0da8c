"""The run cache and the stage contract: switching back restores, declared outputs are checked,
undeclared config reads fail, a failing stage is one line with its traceback in a log file."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.core.runs import current_key, stage_store
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Stage, UndeclaredConfigRead
from pipeline.engine import runner
from pipeline.engine.config import known_competitions, load_config
from pipeline.engine.registry import all_stages
from pipeline.engine.status import STALE, fingerprint_inputs, stage_statuses
from tests.helpers import REPO, make_statefarm_like, statefarm_like_config

CHEAP = ["--set", "stages=[download, split]"]


def kp(*args):
    return CliRunner().invoke(cli, list(args))


def test_switching_a_setting_back_restores_the_stored_run(project):
    work = project / "work" / "digits"
    assert kp("all", "--comp", "digits", *CHEAP).exit_code == 0
    first = (work / "split" / "split.csv").read_bytes()
    started = Manifest.read(work / "split").started
    assert kp("all", "--comp", "digits", *CHEAP, "--set", "split.seed=7").exit_code == 0
    assert (work / "split" / "split.csv").read_bytes() != first
    status = kp("status", "--comp", "digits", *CHEAP).output
    assert "[restorable from the run cache]" in status and "config split.seed: 7 -> 42" in status

    result = kp("all", "--comp", "digits", *CHEAP)
    assert result.exit_code == 0 and "split: restored from the run cache" in result.output
    assert (work / "split" / "split.csv").read_bytes() == first
    assert Manifest.read(work / "split").started == started  # the stored run, not a new one
    assert "up to date (restored from the run cache)" in kp("status", "--comp", "digits", *CHEAP).output
    assert len(stage_store(work, "split").entries()) == 2


def test_a_damaged_output_makes_the_stage_stale_and_a_rerun_repairs_it(project):
    config = load_config("digits", sets=["stages=[download, split]"])
    runner.run(config)
    split_csv = config.work_dir / "split" / "split.csv"
    good = split_csv.read_bytes()
    split_csv.write_bytes(good[:-10])
    states = {s.name: s for s in stage_statuses(config)}
    assert states["split"].state == STALE and states["split"].reasons[0].startswith("output split.csv changed")
    split_csv.unlink()
    assert {s.name: s for s in stage_statuses(config)}["split"].reasons == ["output split.csv missing"]
    runner.run(config)
    assert split_csv.read_bytes() == good


def test_clean_keep_last_keeps_the_current_run_and_reports_sizes(project):
    work = project / "work" / "digits"
    for seed in (1, 2, 3):
        assert kp("all", "--comp", "digits", *CHEAP, "--set", f"split.seed={seed}").exit_code == 0
    assert len(stage_store(work, "split").entries()) == 3
    assert "run cache" in kp("status", "--comp", "digits", *CHEAP).output
    current = current_key(work, "split")
    result = kp("clean", "--comp", "digits", *CHEAP, "--keep-last", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert [e.key for e in stage_store(work, "split").entries()] == [current]
    assert len(stage_store(work, "download").entries()) == 1


def test_a_failing_stage_is_one_line_and_its_traceback_goes_to_a_log(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=3)
    statefarm_like_config(project, archive)
    result = kp("all", "--comp", "synth", "--set", "split.strategy=group_kfold", "--set", "split.folds=5")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert lines == [lines[0]] and "stage split failed: split.folds=5: more folds than the 3 groups" in lines[0]
    assert "Traceback" not in result.output
    log = project / "work" / "synth" / "split.error.log"
    assert "Traceback" in log.read_text() and "split.folds=5" in log.read_text()


def _stage_reading(key: str) -> Stage:
    class Settings(StrictModel):
        pass

    def run(ctx):
        ctx.config.get(key)
        return {}

    return Stage(name="split", settings=Settings, run=run, needs=("download",), reads=("split.seed",))


def test_an_undeclared_config_read_fails(project):
    config = load_config("digits")
    view = all_stages()["split"].view(config)
    assert view.get("split.seed") == 42
    with pytest.raises(UndeclaredConfigRead, match="stage 'split' read config key 'finetune.batch_size'"):
        view.get("finetune.batch_size")
    with pytest.raises(UndeclaredConfigRead):
        view.competition.classes  # split declares no competition key
    download = all_stages()["download"].view(config)
    assert download.competition.slug == "digit-recognizer"  # declared: competition.slug
    with pytest.raises(UndeclaredConfigRead, match="competition.clip"):
        download.competition.clip


def test_a_unit_reads_only_the_keys_its_recipes_declare(project):
    """A unit's view is narrowed to what its key hashes (`StageContext.map_units`): the head recipe's keys."""
    from pipeline.training.recipes import recipe

    config = load_config("digits")
    head = recipe("finetune")
    view = all_stages()["ensemble"].view(config).narrowed(head.keys, "a unit of ensemble-members", "Recipe.reads")
    assert view.section("finetune").batch_size == config.get("finetune.batch_size")
    assert view.get("model.arch") == config.get("model.arch")
    with pytest.raises(UndeclaredConfigRead, match="a unit of ensemble-members read config key 'ensemble.n'"):
        view.get("ensemble.n")  # the stage's own section: not the recipe's, so not in a member's key

    # through the runner: the stage fails with one message naming the key
    runner.run(load_config("digits", sets=["stages=[download]"]))
    status = next(s for s in stage_statuses(config) if s.name == "split")
    with pytest.raises(PipelineError, match="stage split failed: UndeclaredConfigRead: .*'finetune.lr'"):
        runner._guarded(config, _stage_reading("finetune.lr"), status)


@pytest.mark.parametrize("overlay", [None, *sorted(p.name for p in (REPO / "configs" / "offline").glob("*.yaml"))])
def test_every_stage_declares_what_it_reads_for_every_competition(project, overlay):
    """Fingerprints, source stamps and upstream choices of every stage, through each stage's view,
    for every competition file (and every offline overlay of it)."""
    offline = project / "configs" / "offline"
    for comp in known_competitions(project):
        if overlay == "fast.yaml":  # an overlay over the competition's own offline overlay
            if not (offline / f"{comp}.yaml").exists() or comp == "mnist":
                continue
            files = [offline / f"{comp}.yaml", offline / overlay]
        elif overlay and not overlay.startswith(comp):
            continue
        else:
            files = [offline / overlay] if overlay else []
        config = load_config(comp, extra_files=files)
        fingerprints = {}
        for name in config.stage_names:
            stage = all_stages()[name]
            inputs = fingerprint_inputs(stage, config, fingerprints)
            fingerprints[name] = name
            assert inputs["code"][f"stages/{name}.py"]
            assert set(stage.outs), f"{name} declares no outputs"
