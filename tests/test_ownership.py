"""One ownership rule for every delete and overwrite (`pipeline.core.ownership`): kp replaces only what it
made and nobody changed since; anything else is refused in one line naming the path and the way out, and
the project's config files are never written."""
from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.ownership import KP_HEADER
from tests.test_cv import CV, _cross_validated
from tests.test_faults import one_line_error


def _options(sets):
    return [arg for assignment in sets for arg in ("--set", assignment)]


def kp(*args):
    return CliRunner().invoke(cli, list(args))


def test_runs_apply_writes_a_new_overlay_replaces_only_its_own_and_never_a_project_config(warm_project):
    root = warm_project("cv", _cross_validated)
    best = ["runs", "--comp", "synth", *_options(CV), "--best", "--apply"]
    (root / "configs" / "overlays").mkdir()
    mine = root / "configs" / "overlays" / "mine.yaml"  # a user's overlay
    mine.write_text("# my notes\nfinetune:\n  lr: 0.01\n")
    one_line_error(kp(*best, str(mine)), f"{mine}: kp did not write it", "write the overlay to a new file, or pass "
                                                                         "--force to replace it")
    assert mine.read_text() == "# my notes\nfinetune:\n  lr: 0.01\n"
    for project_file in ("synth.yaml", "defaults.yaml"):
        path = root / "configs" / project_file
        before = path.read_text()
        for force in ((), ("--force",)):
            one_line_error(kp(*best, str(path), *force), f"{path}: directly in configs/ live the defaults and each "
                                                         "competition's own file, which kp never writes")
        assert path.read_text() == before
    one_line_error(kp(*best, str(root / "configs" / "new-comp.yaml")), "which kp never writes")

    fresh = root / "best.yaml"
    assert kp(*best, str(fresh)).exit_code == 0
    assert fresh.read_text().startswith(f"{KP_HEADER} kp runs --best --apply")
    assert kp(*best, str(fresh)).exit_code == 0  # its own file: replaced without asking
    assert kp(*best, str(mine), "--force").exit_code == 0
    assert mine.read_text().startswith(KP_HEADER)


def test_package_keeps_what_a_person_added_to_the_bundle_and_a_bundle_it_never_made(warm_project):
    root = warm_project("cv", _cross_validated)
    package = ["package", "--comp", "synth", *_options(CV)]
    bundle = root / "work" / "synth" / "package" / "bundle"
    bundle.mkdir(parents=True)
    (bundle / "mine.txt").write_text("a bundle of my own")
    one_line_error(kp(*package), f"{bundle}: kp did not make this folder", "pass --force")
    assert (bundle / "mine.txt").read_text() == "a bundle of my own"
    bundle.joinpath("mine.txt").unlink()
    bundle.rmdir()

    assert kp(*package).exit_code == 0
    assert kp(*package).exit_code == 0  # its own bundle, unchanged: replaced
    (bundle / "notes.md").write_text("what I tried")
    one_line_error(kp(*package), f"{bundle / 'notes.md'}: added after kp wrote bundle/", "move them out of it")
    (bundle / "notes.md").unlink()
    (bundle / "extra").mkdir()
    (bundle / "extra" / "a.txt").write_text("x")
    kernel = bundle / "kernel.py"
    kernel.write_text(kernel.read_text() + "# my edit\n")
    error = one_line_error(kp(*package), "(and 1 more): kp replaces only what it made")
    assert "bundle/extra/a.txt: added after" in error or "kernel.py: changed since kp wrote it" in error
    assert kernel.read_text().endswith("# my edit\n")
    assert kp(*package, "--force").exit_code == 0
    assert not (bundle / "extra").exists() and not kernel.read_text().endswith("# my edit\n")
    assert json.loads((bundle / ".entry.json").read_text())["files"]["kernel.py"][0] == kernel.stat().st_size


def test_a_blend_source_or_sweep_trial_may_not_move_the_work_folder(warm_project, tmp_path):
    root = warm_project("cv", _cross_validated)
    elsewhere = tmp_path / "users-folder"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    sources = ("blend.sources=[{stage: cv}, {stage: cv, name: moved, set: {paths.work: %s}}]" % elsewhere)
    blend = [s.replace("cv, submit", "cv, blend, submit") for s in CV] + [sources, "submit.source=blend"]
    one_line_error(kp("status", "--comp", "synth", *_options(blend)), "blend.sources[1].set: 'paths.work'")
    one_line_error(kp("sweep", "--comp", "synth", *_options(CV), "--grid", f"paths.work={elsewhere},{tmp_path}"),
                   "'paths.work'", "paths.* may not change for one variant")
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]
    assert (root / "work" / "synth").is_dir()


def test_submit_replaces_only_a_submission_it_published(warm_project):
    from tests.test_faults import DIGITS_CHEAP, _digits_cheap

    root = warm_project("digits-cheap", _digits_cheap)
    sets = [*_options(DIGITS_CHEAP), "--set", "submit.name=final"]
    mine = root / "submissions" / "digits" / "final.csv"
    mine.write_text("ImageId,Label\n1,7\n")  # a file of the user's, named as the submission would be
    one_line_error(kp("submit", "--comp", "digits", *sets), f"{mine}: kp did not write it (no final.json of kp's "
                                                             "beside it)", "choose another submit.name")
    assert mine.read_text() == "ImageId,Label\n1,7\n"
    mine.unlink()
    assert kp("submit", "--comp", "digits", *sets).exit_code == 0
    assert kp("submit", "--comp", "digits", *sets, "--force").exit_code == 0  # its own: replaced
