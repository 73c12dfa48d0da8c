"""Fingerprint rules, skip-when-up-to-date, and outputs that survive crashes and SIGKILL whole."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from pipeline.core import code_version
from pipeline.core.cache import MANIFEST, Manifest, competition_lock, fingerprint, sweep_partial
from pipeline.core.errors import PipelineError
from pipeline.core.runs import RunStore
from pipeline.data.arrays import ChunkedArrayWriter, load_array
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.engine.registry import all_stages
from pipeline.engine.status import MISSING, STALE, UP_TO_DATE, explain, fingerprint_inputs, stage_statuses
from tests.helpers import REPO, make_statefarm_like, start_kp, statefarm_like_config, wait_for_partial


UPSTREAM_ONLY = ["stages=[download, split]"]  # digits' cheap stages: these tests are about the cache


def digits(*sets):
    return load_config("digits", sets=[*UPSTREAM_ONLY, *sets])


def states(config) -> dict[str, tuple[str, list[str]]]:
    return {s.name: (s.state, s.reasons) for s in stage_statuses(config)}


def test_run_then_everything_is_up_to_date_and_skipped(project):
    config = digits()
    assert {name: st for name, (st, _) in states(config).items()} == {"download": MISSING, "split": MISSING}
    runner.run(config)
    assert all(state == UP_TO_DATE for state, _ in states(config).values())
    first = Manifest.read(config.work_dir / "download")
    runner.run(digits())
    assert Manifest.read(config.work_dir / "download").started == first.started  # skipped, not rerun


def test_downstream_key_change_leaves_upstream_up_to_date(project):
    runner.run(digits())
    download_before = Manifest.read(digits().work_dir / "download")
    changed = digits("split.seed=7")
    now = states(changed)
    assert now["download"][0] == UP_TO_DATE
    assert now["split"] == (STALE, ["config split.seed: 42 -> 7"])
    runner.run(changed)
    assert Manifest.read(changed.work_dir / "download").started == download_before.started
    assert all(state == UP_TO_DATE for state, _ in states(changed).values())


def test_upstream_change_makes_everything_after_it_stale(project):
    runner.run(digits())
    changed = digits("download.bad_images=fail")
    now = states(changed)
    assert now["download"] == (STALE, ["config download.bad_images: 'skip' -> 'fail'"])
    assert now["split"] == (STALE, ["upstream download changed"])


def test_a_key_no_stage_reads_changes_nothing(project):
    runner.run(digits())
    changed = digits("competition.clip=[0.1, 0.9]")  # read only by submit, not listed here
    assert all(state == UP_TO_DATE for state, _ in states(changed).values())


def test_source_file_changes_are_explained(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, archive)
    runner.run(load_config("synth"))
    # replacing the archive (new size / mtime) makes download stale
    archive.write_bytes(archive.read_bytes() + b"")
    os.utime(archive, (time.time() + 10, time.time() + 10))
    state, reasons = states(load_config("synth"))["download"]
    assert state == STALE and reasons[0].startswith("source changed")


def _all_inputs(config) -> dict[str, dict]:
    stages, fingerprints, inputs = all_stages(), {}, {}
    for name in config.stage_names:
        inputs[name] = fingerprint_inputs(stages[name], config, fingerprints)
        fingerprints[name] = fingerprint(inputs[name])
    return inputs


def _code_copy(tmp_path, monkeypatch):
    """A copy of the code that `code_version` hashes instead of the checkout's."""
    copy = tmp_path / "code"
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_version, "PROJECT", copy)
    return copy


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{path}: {old!r} not found"
    path.write_text(text.replace(old, new, 1))


def test_editing_the_head_recipe_makes_exactly_its_users_stale(project, tmp_path, monkeypatch):
    copy = _code_copy(tmp_path, monkeypatch)
    config = load_config("digits", sets=["stages=[download,split,precompute,augment,finetune,bnretrain,tune,"
                                         "ensemble,cv,smooth,pseudo,submit]", "split.strategy=kfold",
                                         "split.folds=3", "precompute.backbone=mobilenet", "precompute.alpha=0.25",
                                         "competition.image_size=[32,32]", "competition.channels=3",
                                         "model.arch=pool", "pseudo.source=cv", "smooth.source=cv"])
    before = _all_inputs(config)
    head = copy / "pipeline" / "training" / "recipes" / "head.py"
    head.write_text(head.read_text() + "EDITED = True\n")
    after = _all_inputs(config)
    by_code = {name for name in before if any(r.startswith("code changed") for r in explain(before[name], after[name]))}
    assert by_code == {"finetune", "bnretrain", "ensemble", "cv", "pseudo"}
    for name in by_code:
        assert explain(before[name], after[name])[0] == "code changed: pipeline/training/recipes/head.py"
    assert explain(before["tune"], after["tune"]) == ["upstream finetune changed"]
    for name in ("download", "split", "precompute", "augment"):
        assert explain(before[name], after[name]) == []


def _unit_function_modules() -> set[str]:
    """The modules of every function a stage hands to `map_units` / `plan_units` as its units' function, read from the
    source (the name's import in the calling module, or the calling module itself): derived, not listed."""
    import ast

    modules = set()
    for path in [*(REPO / "stages").glob("*.py"), *(REPO / "pipeline").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        imported = {alias.asname or alias.name: node.module for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}
        own = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("map_units", "plan_units") \
                    and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Name):
                modules.add(imported.get(node.args[1].id, own))
    return modules


def test_editing_a_plot_reruns_stages_but_no_unit_they_hold(project, tmp_path, monkeypatch):
    """Units are keyed by the code their function and recipes reach, which draws nothing."""
    from pipeline.core.code_version import code_hashes
    from pipeline.training.recipes import MODULES

    copy = _code_copy(tmp_path, monkeypatch)
    unit_modules = (*_unit_function_modules(), *MODULES.values())
    assert {"pipeline.training.recipes", "pipeline.training.cross_validation", "pipeline.models.passes",
            "pipeline.models.extractor"} <= set(unit_modules)
    units_before = {module: code_hashes(module) for module in unit_modules}
    config = load_config("digits")
    before = _all_inputs(config)
    _edit(copy / "pipeline" / "evaluation" / "plots.py", 'dpi: int = 90', 'dpi: int = 91')
    _edit(copy / "stages" / "finetune.py", "val log loss", "validation log loss")
    _edit(copy / "stages" / "precompute.py", "normalised by train mean", "normalised by the train mean")  # a headline
    assert {module: code_hashes(module) for module in unit_modules} == units_before
    after = _all_inputs(config)
    assert "stages/finetune.py" in explain(before["finetune"], after["finetune"])[0]
    assert "pipeline/evaluation/plots.py" in explain(before["ensemble"], after["ensemble"])[0]


def _every_unit_sets() -> list[str]:
    """The synthetic competition through every stage with units: precompute's features, augment's passes,
    finetune, bnretrain and ensemble members."""
    from tests.test_augment import AUGMENTED

    return [s.replace("augment, finetune, submit", "augment, finetune, bnretrain, ensemble, submit") for s in AUGMENTED] + [
        "finetune.augmented=true", "ensemble.n=2", "ensemble.source=bnretrain", "submit.source=ensemble"]


def _every_unit(root):
    archive = make_statefarm_like(root.parent / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(root, archive)
    runner.run(load_config("synth", sets=_every_unit_sets()))


@pytest.mark.slow  # 23 s (2026-12-06); the default tier keeps the same rule on the code hashes (the test above)
def test_after_a_plot_edit_the_stages_rerun_and_redraw_without_training_or_a_forward_pass(warm_project, tmp_path,
                                                                                          monkeypatch):
    sets = _every_unit_sets()
    warm_project("every-unit", _every_unit)
    config = load_config("synth", sets=sets)
    before = {s.name: s.manifest for s in stage_statuses(config)}
    copy = _code_copy(tmp_path, monkeypatch)
    _edit(copy / "pipeline" / "evaluation" / "plots.py", 'dpi: int = 90', 'dpi: int = 91')
    stale = {s.name: s.reasons for s in stage_statuses(config) if s.state != UP_TO_DATE}
    drawing = {"augment", "finetune", "bnretrain", "ensemble"}  # the stages that draw with plots.py
    assert set(stale) == drawing | {"submit"} and stale["submit"] == ["upstream ensemble changed"]
    assert all(stale[name][0].startswith("code changed: pipeline/evaluation/plots.py") for name in drawing)
    runner.run(config)
    after = {s.name: s.manifest for s in stage_statuses(config)}
    for name in ("download", "split", "precompute"):
        assert after[name].finished == before[name].finished
    assert after["augment"].metrics["computed"] == 0 and after["augment"].metrics["reused"] == 5  # no forward pass
    assert after["finetune"].metrics["reused"] and after["bnretrain"].metrics["reused"]
    assert after["ensemble"].metrics["trained"] == 0  # every member reused
    for name in drawing:  # each reran (its plots drawn again) in seconds
        assert after[name].finished >= before[name].finished and after[name].fingerprint != before[name].fingerprint


def test_precompute_restores_its_features_unless_what_computes_them_changed(project, tmp_path, monkeypatch):
    """precompute's features are units keyed by the images' content, its settings and the shard function's
    code: an edit of the stage's own module reruns it without a forward pass (same bytes, nothing after it
    runs), so does a forced run with another shard size; an edit of the extractor computes them again."""
    from tests.test_transfer import TINY_VGG

    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive)
    sets = [*TINY_VGG, "stages=[download, split, precompute, augment]", "augment.passes=1"]
    config = load_config("synth", sets=sets)
    runner.run(config)
    folder = config.work_dir / "precompute"
    arrays = {subset: (folder / f"{subset}.npy").read_bytes() for subset in ("train", "test")}
    copy = _code_copy(tmp_path, monkeypatch)
    _edit(copy / "stages" / "precompute.py", '" (features reused)"', '" (features restored)"')  # its headline (hashed)
    assert states(config)["precompute"] == (STALE, ["code changed: stages/precompute.py"])
    actions = {}
    runner.run(config, actions=actions)
    assert actions["precompute"] == "ran" and {actions[name] for name in actions if name != "precompute"} == {"skipped"}
    timings = Manifest.read(folder).metrics["timings"]
    assert timings["train"]["reused"] and timings["test"]["reused"]
    assert {subset: (folder / f"{subset}.npy").read_bytes() for subset in arrays} == arrays
    assert Manifest.read(folder).headline.endswith("(features reused)")

    runner.run(load_config("synth", sets=[*sets, "compute.shard_size=16"]), ["precompute"], force=True)
    assert Manifest.read(folder).metrics["timings"]["train"]["reused"]  # where and in what pieces: in no key

    extractor = copy / "pipeline" / "models" / "extractor.py"
    extractor.write_text(extractor.read_text() + "EDITED = True\n")
    assert states(config)["precompute"] == (STALE, ["code changed: pipeline/models/extractor.py"])
    runner.run(load_config("synth", sets=[*sets, "compute.shard_size=16"]), ["precompute"])
    timings = Manifest.read(folder).metrics["timings"]
    assert not timings["train"]["reused"] and (timings["train"]["shards"], timings["test"]["shards"]) == (3, 1)
    assert {subset: (folder / f"{subset}.npy").read_bytes() for subset in arrays} == arrays  # 48 rows in 3 shards
    assert not list((config.work_dir / "_runs" / "precompute-shards").glob("*/shard.npy"))  # stitched, then dropped


def test_failed_stage_leaves_previous_output_untouched(project):
    config = digits()
    runner.run(config)
    split_csv = (config.work_dir / "split" / "split.csv").read_bytes()
    with pytest.raises(PipelineError):  # the digits index has no groups
        runner.run(digits("split.strategy=group"))
    assert (config.work_dir / "split" / "split.csv").read_bytes() == split_csv
    assert not list(config.work_dir.rglob(".tmp-*"))
    assert states(config)["split"][0] == UP_TO_DATE


def test_a_stored_run_replaces_an_entry_only_on_success(tmp_path):
    store = RunStore(tmp_path / "stage")
    with store.write("fp1") as out:
        (out / "a.txt").write_text("one")
    with pytest.raises(RuntimeError):
        with store.write("fp1") as out:
            (out / "a.txt").write_text("two")
            raise RuntimeError("crash")
    assert (store.path("fp1") / "a.txt").read_text() == "one" and store.has("fp1")
    assert [p.name for p in store.root.iterdir()] == ["fp1"]


def test_sweep_restores_a_run_killed_between_renames_and_clears_leftovers_everywhere(tmp_path):
    runs = tmp_path / "_runs" / "split"
    (runs / ".old-fp1.kp-0123abcd").mkdir(parents=True)
    (runs / ".old-fp1.kp-0123abcd" / MANIFEST).write_text("{}")
    (runs / ".tmp-fp2-99.kp-def45678").mkdir()
    (tmp_path / "_runs" / "ensemble-members" / ".tmp-key-1.kp-aaaaaaaa").mkdir(parents=True)
    (tmp_path / "_cache" / "kaggle" / ".tmp-download.kp-12345678").mkdir(parents=True)
    (tmp_path / ".tmp-notes").write_text("a user's file")  # names kp never makes: left alone
    (runs / ".tmp-mine-abc123").mkdir()
    removed = sweep_partial(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-download.kp-12345678", ".tmp-fp2-99.kp-def45678",
                                               ".tmp-key-1.kp-aaaaaaaa"]
    assert (runs / "fp1" / MANIFEST).exists()
    assert (tmp_path / ".tmp-notes").is_file() and (runs / ".tmp-mine-abc123").is_dir()


def test_second_run_on_the_same_competition_is_refused(tmp_path):
    with competition_lock(tmp_path):
        with pytest.raises(PipelineError, match="another kp run"):
            with competition_lock(tmp_path):
                pass


def _kill_when_partial(process, work_dir, stage: str):
    """SIGKILL `process` as soon as its temporary output for `stage` holds files."""
    partial = wait_for_partial(process, work_dir / "_runs" / stage, "*.jpg")
    process.send_signal(signal.SIGKILL)
    process.wait()
    return partial


def test_sigkill_mid_write_leaves_no_accepted_artifact_and_rerun_succeeds(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=20, classes=10, per_driver_class=12)
    statefarm_like_config(project, archive, classes=10)
    work = project / "work" / "synth"

    # first run killed mid-write: nothing accepted
    partial = _kill_when_partial(start_kp(project, "all", "--comp", "synth"), work, "download")
    assert partial.exists()  # the half-written folder is there ...
    config = load_config("synth")
    assert states(config)["download"][0] == MISSING  # ... but never accepted
    assert not (work / "download").exists()

    # a rerun sweeps the leftovers and succeeds
    done = start_kp(project, "all", "--comp", "synth")
    output = done.communicate()[0].decode()
    assert done.returncode == 0, output
    assert "left by an interrupted run" in output
    assert all(state == UP_TO_DATE for state, _ in states(config).values())
    assert not list(work.rglob(".tmp-*"))
    good = (work / "download" / "index.csv").read_bytes()

    # a forced rerun killed mid-write keeps the previous good output
    _kill_when_partial(start_kp(project, "download", "--force", "--comp", "synth"), work, "download")
    assert (work / "download" / "index.csv").read_bytes() == good
    assert states(config)["download"][0] == UP_TO_DATE


def test_chunked_array_is_written_in_pieces_and_read_memory_mapped(tmp_path):
    path = tmp_path / "features.npy"
    data = np.arange(10 * 3 * 2, dtype=np.float16).reshape(10, 3, 2)
    with ChunkedArrayWriter(path, 10, (3, 2), np.float16) as writer:
        for start in range(0, 10, 4):
            writer.append(data[start:start + 4])
    loaded = load_array(path)
    assert isinstance(loaded, np.memmap) and not loaded.flags.writeable
    np.testing.assert_array_equal(loaded, data)
    short = ChunkedArrayWriter(tmp_path / "short.npy", 10, (3, 2), np.float16)
    short.append(data[:4])
    with pytest.raises(ValueError, match="closed after 4 of 10 rows"):
        short.close()
    with pytest.raises(ValueError, match="chunk rows have shape"):
        short.append(np.zeros((2, 5)))


def test_manifest_records_inputs_timing_sizes_and_metrics(project):
    config = digits()
    runner.run(config)
    manifest = json.loads((config.work_dir / "split" / MANIFEST).read_text())
    assert manifest["inputs"]["config"]["split"]["fraction"] == 0.2
    download = Manifest.read(config.work_dir / "download")
    assert manifest["inputs"]["upstream"]["download"] == "digest:" + download.digest  # what it read, by content
    assert manifest["reads"]["download"] == download.fingerprint  # which stored run that was
    assert manifest["duration_s"] >= 0 and manifest["outputs"]["split.csv"] > 0
    assert manifest["metrics"]["n_valid"] == 300


def test_content_stamps_ignore_a_copy_but_see_a_same_size_edit(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, archive)
    config = load_config("synth", sets=["cache.stamp=content", "stages=[download]"])
    runner.run(config)
    stamp = os.stat(archive)
    copy = tmp_path / "copy.zip"
    shutil.copy(archive, copy)  # a copy: new mtime, same bytes
    os.replace(copy, archive)
    assert os.stat(archive).st_mtime_ns != stamp.st_mtime_ns
    assert states(config)["download"][0] == UP_TO_DATE
    data = bytearray(archive.read_bytes())
    data[-30] ^= 0xFF  # a same-size edit, within the same second
    archive.write_bytes(bytes(data))
    os.utime(archive, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert states(config)["download"][0] == STALE


def test_an_upstream_rerun_that_writes_the_same_outputs_leaves_what_reads_it_up_to_date(project):
    """Early cutoff: download's fingerprint changes (a setting that changes nothing here: the digits hold no bad
    image), it reruns and writes the same index and images, and split is not run again."""
    from pipeline.engine.status import format_table

    runner.run(digits())
    split_before = Manifest.read(digits().work_dir / "split")
    changed = digits("download.bad_images=fail")
    assert states(changed)["split"] == (STALE, ["upstream download changed"])  # not known before download reruns
    actions = {}
    runner.run(changed, actions=actions)
    assert actions == {"download": "ran", "split": "skipped"}
    assert Manifest.read(changed.work_dir / "split").started == split_before.started
    now = {s.name: s for s in stage_statuses(changed)}
    assert all(s.state == UP_TO_DATE for s in now.values()) and now["download"].same_outputs
    assert "up to date (reran: same outputs)" in format_table(list(now.values()))


def test_a_comment_changes_no_code_hash_and_a_statement_does(tmp_path, monkeypatch):
    from pipeline.core.code_version import code_hashes

    copy = _code_copy(tmp_path, monkeypatch)
    before = code_hashes("stages.precompute")
    stage = copy / "stages" / "precompute.py"
    stage.write_text(stage.read_text().replace("\ndef run(", "\n# a comment, and a blank line\n\ndef run(", 1))
    assert code_hashes("stages.precompute") == before
    stage.write_text(stage.read_text() + "EDITED = True\n")
    assert code_hashes("stages.precompute")["stages/precompute.py"] != before["stages/precompute.py"]


def test_the_download_stage_hashes_no_submission_or_polling_code(project):
    """A stage's code is what it runs: download reads pipeline/kaggle/api.py, not the submissions' code."""
    code = {s.name: s.inputs["code"] for s in stage_statuses(load_config("digits"))}
    assert "pipeline/kaggle/api.py" in code["download"]
    assert not [name for stage in code.values() for name in stage if name == "pipeline/kaggle/submissions.py"]
