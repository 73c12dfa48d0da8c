"""Bad input and a hostile filesystem: each fault ends as one message (exit status 2, no traceback)
naming what is wrong and where, nothing already written is lost, and the next correct run works.

The other faults of the matrix are tested where their mechanism lives: archives (test_archive.py:
truncated, non-zip, traversal, absolute and symlink members), download (test_download.py: missing
members, wrong headers, out-of-range labels, undecodable images, missing credentials), the Kaggle
server (test_leaderboard.py / test_kaggle_local.py: server down, 403, 404, rejected upload), the
cache (test_cache.py: two runs at once, SIGKILL mid-write, leftovers swept everywhere).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.core.artifacts import TMP_PREFIX
from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.data.arrays import ChunkedArrayWriter, load_array
from tests.helpers import (image_bytes, make_statefarm_like, nested_zip, start_kp, statefarm_like_config,
                           wait_for_partial, write_config)

CHEAP = ["--set", "stages=[download, split]"]


def kp(*args):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, *fragments: str) -> str:
    """The run failed with exit status 2 and exactly one `Error:` line holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@contextlib.contextmanager
def mounted_tmpfs(folder, size: str, read_only: bool = False):
    """A small tmpfs at `folder` (needs root, as on CI and these machines; skipped otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_tiff_named_jpg_is_caught_at_download_by_the_decoder_precompute_uses(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", replaced={"img_3.jpg": image_bytes(3, fmt="TIFF")})
    statefarm_like_config(project, archive)
    one_line_error(kp("download", "--comp", "synth", "--set", "download.bad_images=fail"),
                   "train/c0/img_3.jpg", "TIFF")
    result = kp("all", "--comp", "synth", "--set", "stages=[download, split, precompute]",
                "--set", "precompute.backbone=none")
    assert result.exit_code == 0, result.output
    assert "skipped 1 undecodable items: train/c0/img_3.jpg" in result.output
    assert Manifest.read(project / "work" / "synth" / "precompute").metrics["n_train"] == 71


def test_an_image_damaged_after_download_fails_precompute_by_name(project, tmp_path):
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data"))
    assert kp("download", "--comp", "synth").exit_code == 0
    target = project / "work" / "synth" / "download" / "raw" / "train" / "c1" / "img_5.jpg"
    target.write_bytes(image_bytes(5, fmt="TIFF"))
    one_line_error(kp("precompute", "--comp", "synth", "--set", "stages=[download, split, precompute]",
                      "--set", "precompute.backbone=none"),
                   "stage precompute failed", "raw/train/c1/img_5.jpg")


def test_a_skipped_pixels_row_is_really_skipped_downstream(project, tmp_path):
    folder = tmp_path / "digits-like"
    folder.mkdir()
    header = "label," + ",".join(f"pixel{i}" for i in range(4))
    (folder / "train.csv").write_text(f"{header}\n1,0,255,0,3\n0,1,abc,3,4\n1,9,9,9,9\n0,1,2,3,4\n0,4,3,2,1\n")
    (folder / "test.csv").write_text(",".join(f"pixel{i}" for i in range(4)) + "\n1,2,3,4\n")
    (folder / "sample_submission.csv").write_text("ImageId,Label\n1,0\n")
    write_config(project, "tiny", f"""
extends: digits.yaml
competition: {{classes: ["0", "1"], image_size: [2, 2]}}
stages: [download, split, precompute]
download: {{source: {folder}}}
split: {{fraction: 0.5}}
""")
    result = kp("all", "--comp", "tiny")
    assert result.exit_code == 0, result.output
    assert "skipped 1 undecodable items: train.csv row 1" in result.output
    assert np.load(project / "work" / "tiny" / "precompute" / "train.npy").shape == (4, 2, 2, 1)


def test_disk_full_is_one_message_and_the_earlier_outputs_survive(project, tmp_path):
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data"))
    with mounted_tmpfs(tmp_path / "small", "2m") as small:
        sets = ["--set", f"paths.work={small}", "--set", "stages=[download, split, precompute]",
                "--set", "precompute.backbone=none", "--set", "competition.image_size=[160, 160]",
                "--set", "precompute.dtype=float32"]  # 72 x 160 x 160 x 3 float32 = 22 MB > 2 MB
        assert kp("split", "--comp", "synth", *sets).exit_code == 0
        index = (small / "synth" / "download" / "index.csv").read_bytes()
        one_line_error(kp("precompute", "--comp", "synth", *sets),
                       "stage precompute failed: disk full while writing", "train.npy", "MB free there")
        assert (small / "synth" / "download" / "index.csv").read_bytes() == index
        status = kp("status", "--comp", "synth", *sets).output
        assert "download    up to date" in status and "split       up to date" in status


def test_the_chunked_writer_reserves_its_space_before_writing(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "1m") as small:
        with pytest.raises(OSError) as raised:
            ChunkedArrayWriter(small / "big.npy", 1000, (32, 32, 3), np.float32)  # 12 MB
        assert raised.value.filename == str(small / "big.npy")
        assert not (small / "big.npy").exists()


def test_a_competition_name_is_never_a_path(project):
    (project / "configs" / "dogscats").mkdir()
    (project / "configs" / "dogscats" / "keep.txt").write_text("x")
    one_line_error(kp("clean", "--comp", "../configs/dogscats"), "a competition is a plain name")
    one_line_error(kp("status", "--comp", "/etc/passwd"), "a competition is a plain name")
    assert (project / "configs" / "dogscats" / "keep.txt").exists()


def test_work_folders_that_are_files_or_read_only(project, tmp_path):
    (tmp_path / "a-file").write_text("x")
    one_line_error(kp("all", "--comp", "digits", *CHEAP, "--set", f"paths.work={tmp_path / 'a-file'}"),
                   str(tmp_path / "a-file"), "a file is in the way")
    (project / "work").mkdir()
    (project / "work" / "digits").write_text("x")
    one_line_error(kp("all", "--comp", "digits", *CHEAP), "work/digits", "a file is in the way")
    (project / "work" / "digits").unlink()
    (tmp_path / "subs").write_text("x")
    result = kp("all", "--comp", "digits", "--set", "stages=[download, split, precompute, finetune, submit]",
                "--set", "submit.source=finetune", "--set", "finetune.phases=[{epochs: 1, lr: 0.001}]",
                "--set", "model.arch=linear", "--set", "finetune.augment=null",
                "--set", f"paths.submissions={tmp_path / 'subs'}")
    one_line_error(result, "stage submit failed", str(tmp_path / "subs"), "a file is in the way")
    assert Manifest.read(project / "work" / "digits" / "finetune") is not None  # the trained model is kept
    with mounted_tmpfs(tmp_path / "ro", "1m", read_only=True) as read_only:
        one_line_error(kp("all", "--comp", "digits", *CHEAP, "--set", f"paths.work={read_only}"),
                       str(read_only / "digits"), "cannot write here")


def test_a_malformed_kaggle_json_is_named(project, kaggle_env, tmp_path):
    kaggle_env.delenv("KAGGLE_USERNAME")
    kaggle_env.delenv("KAGGLE_KEY")
    folder = tmp_path / "kaggle-config"
    folder.mkdir(exist_ok=True)
    (folder / "kaggle.json").write_text('{"username": "me", "key": ')
    one_line_error(kp("download", "--comp", "dogscats"), str(folder / "kaggle.json"), "not valid JSON")
    (folder / "kaggle.json").write_text('{"username": "me"}')
    one_line_error(kp("download", "--comp", "dogscats"), str(folder / "kaggle.json"), "'key'")


def test_a_corrupt_ledger_is_named_and_never_rewritten(project):
    ledger = project / "submissions" / "digits" / "ledger.csv"
    ledger.parent.mkdir(parents=True)
    ledger.write_text("time,file\n2026,x.csv\n")
    one_line_error(kp("ledger", "--comp", "digits"), str(ledger), "missing column(s) fingerprint")
    one_line_error(kp("status", "--comp", "digits", *CHEAP), str(ledger), "missing column(s)")
    assert ledger.read_text() == "time,file\n2026,x.csv\n"


def test_a_truncated_array_is_named_when_read(tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, np.zeros((100, 8), np.float32))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(PipelineError, match=r"train.npy: truncated: its header says 100 rows of \(8,\) float32"):
        load_array(path)


def test_wrong_kinds_of_values_and_an_empty_overlay(project, tmp_path):
    one_line_error(kp("status", "--comp", "digits", "--set", "finetune.batch_size=true"),
                   "finetune.batch_size", "expected a number, got True")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    result = kp("status", "--comp", "digits", "--config", str(empty))
    assert result.exit_code == 0 and f"warning: {empty}: empty, changes nothing" in result.output


def test_ctrl_c_mid_stage_loses_nothing_and_the_rerun_gives_the_same_result(project, tmp_path):
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data", drivers=20, classes=10, per_driver_class=12),
                          classes=10)
    reference = tmp_path / "reference"
    assert kp("all", "--comp", "synth", "--set", f"paths.work={reference}").exit_code == 0
    work = project / "work" / "synth"
    process = start_kp(project, "all", "--comp", "synth")
    wait_for_partial(process, work / "_runs" / "download", "*.jpg")
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 130 and "Traceback" not in output, output
    assert "interrupted: the stage that was running left nothing that will be accepted" in output
    assert not (work / "download").exists() and not list(work.rglob(".tmp-*"))
    assert kp("all", "--comp", "synth").exit_code == 0
    for name in ("download/index.csv", "split/split.csv"):
        assert (work / name).read_bytes() == (reference / "synth" / name).read_bytes()


def test_sigkill_in_precompute_then_the_rerun_gives_the_same_arrays(project, tmp_path):
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data", drivers=10, classes=6, per_driver_class=6),
                          classes=6)
    sets = ["--set", "stages=[download, split, precompute]", "--set", "precompute.backbone=none",
            "--set", "competition.image_size=[96, 96]", "--set", "precompute.batch_size=8"]
    assert kp("split", "--comp", "synth", *sets).exit_code == 0
    work = project / "work" / "synth"
    process = start_kp(project, "precompute", "--comp", "synth", *sets)
    wait_for_partial(process, work / "_runs" / "precompute", "train.npy")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert kp("status", "--comp", "synth", *sets).output.count("missing") == 1  # precompute only
    assert kp("precompute", "--comp", "synth", *sets).exit_code == 0
    first = np.load(work / "precompute" / "train.npy")
    assert kp("precompute", "--comp", "synth", *sets, "--force").exit_code == 0
    np.testing.assert_array_equal(np.load(work / "precompute" / "train.npy"), first)
    assert not list(work.rglob(".tmp-*"))


def _outer_zip(good: Path, path: Path, add: dict | None = None, drop: set = frozenset(),
               images: dict | None = None, symlink: str | None = None, text: dict | None = None) -> Path:
    """A variant of a good State-Farm-like SLUG.zip: members added, dropped or rewritten, images
    inside its imgs.zip replaced."""
    with zipfile.ZipFile(good) as zf:
        members = {name: zf.read(name) for name in zf.namelist() if name not in drop}
    if images:
        with zipfile.ZipFile(io.BytesIO(members["imgs.zip"])) as inner:
            files = {name: inner.read(name) for name in inner.namelist()}
        members["imgs.zip"] = nested_zip({**files, **images})
    members.update(add or {})
    members.update({name: value.encode() for name, value in (text or {}).items()})
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 12), (10, 200, 30, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


BAD_ARCHIVES = {
    "truncated zip": (lambda good, p: (p.write_bytes(good.read_bytes()[:500]), p)[1], "corrupt or truncated"),
    "not a zip": (lambda good, p: (p.write_bytes(b"<html>not found</html>"), p)[1], "not a readable zip"),
    "traversal member": (lambda good, p: _outer_zip(good, p, add={"../evil.txt": b"x"}), "contains '..'"),
    "absolute member": (lambda good, p: _outer_zip(good, p, add={"/tmp/kp-evil.txt": b"x"}), "absolute path"),
    "symlink member": (lambda good, p: _outer_zip(good, p, symlink="link"), "symbolic link"),
    "missing member": (lambda good, p: _outer_zip(good, p, drop={"driver_imgs_list.csv"}),
                       "missing expected member(s) ['driver_imgs_list.csv']"),
    "wrong CSV header": (lambda good, p: _outer_zip(good, p, text={"driver_imgs_list.csv": "a,b,c\n1,2,3\n"}),
                         "wrong header: expected columns img,classname,subject"),
    "unknown class folder": (lambda good, p: _outer_zip(good, p, images={"train/c9/img_0x.jpg": image_bytes(1)}),
                             "folder name is not one of competition.classes"),
    "zero-byte image": (lambda good, p: _outer_zip(good, p, images={"train/c0/img_1.jpg": b""}), "train/c0/img_1.jpg"),
    "garbage image": (lambda good, p: _outer_zip(good, p, images={"train/c0/img_2.jpg": b"\x00garbage" * 50}),
                      "train/c0/img_2.jpg"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_a_bad_archive_is_one_message_and_the_good_download_stays(project, tmp_path, case):
    good = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, good)
    assert kp("download", "--comp", "synth").exit_code == 0
    index = (project / "work" / "synth" / "download" / "index.csv").read_bytes()
    build, fragment = BAD_ARCHIVES[case]
    bad = build(good, tmp_path / "bad.zip")
    error = one_line_error(kp("download", "--comp", "synth", "--set", f"download.source={bad}",
                              "--set", "download.bad_images=fail"), fragment)
    assert TMP_PREFIX not in error  # the archive and its member, not the run's temporary folder
    assert (project / "work" / "synth" / "download" / "index.csv").read_bytes() == index
    assert not Path("/tmp/kp-evil.txt").exists() and not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "grayscale", "CMYK", "huge"])
def test_images_that_are_unusual_but_fine_are_used(project, tmp_path, fmt):
    data = {"PNG": image_bytes(7, fmt="PNG"), "WEBP": image_bytes(7, fmt="WEBP"),
            "grayscale": _gray_jpeg(), "CMYK": _cmyk_jpeg(), "huge": image_bytes(7, size=(4000, 3000))}[fmt]
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data", replaced={"img_7.jpg": data}))
    result = kp("all", "--comp", "synth", "--set", "stages=[download, split, precompute]",
                "--set", "precompute.backbone=none", "--set", "download.bad_images=fail")
    assert result.exit_code == 0, result.output
    assert np.isfinite(np.load(project / "work" / "synth" / "precompute" / "train.npy")).all()


def _gray_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 12), 128).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_disk_full_while_writing_the_submission_names_it(project, tmp_path):
    with mounted_tmpfs(tmp_path / "tiny", "64k") as tiny:
        (tiny / "filler").write_bytes(b"x" * 60_000)
        result = kp("all", "--comp", "digits", "--set", "stages=[download, split, precompute, finetune, submit]",
                    "--set", "submit.source=finetune", "--set", "finetune.phases=[{epochs: 1, lr: 0.001}]",
                    "--set", "model.arch=linear", "--set", "finetune.augment=null",
                    "--set", f"paths.submissions={tiny}")
        one_line_error(result, "stage submit failed: disk full while writing", str(tiny / "digits"))
    assert Manifest.read(project / "work" / "digits" / "finetune") is not None


QUICK_DIGITS = ["--set", "finetune.phases=[{epochs: 2, lr: 0.003}]", "--set", "model.arch=cnn",
                "--set", "finetune.augment=null", "--set", "ensemble.n=2"]
COMPARED = {"download": ["index.csv"], "split": ["split.csv"], "precompute": ["train.npy", "test.npy"],
            "finetune": ["valid_probs.npy", "test_probs.npy", "history.csv"],
            "ensemble": ["valid_probs.npy", "test_probs.npy"], "submit": ["submission.csv"]}


@pytest.mark.slow
def test_sigkill_in_every_stage_then_the_rerun_gives_the_same_bytes(project, tmp_path):
    reference = tmp_path / "reference"
    assert kp("all", "--comp", "digits", *QUICK_DIGITS, "--set", f"paths.work={reference}").exit_code == 0
    work = project / "work" / "digits"
    for stage, files in COMPARED.items():
        process = start_kp(project, stage, "--comp", "digits", *QUICK_DIGITS)
        wait_for_partial(process, work / "_runs" / stage, None)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert Manifest.read(work / stage) is None, stage  # nothing of the killed run is accepted
        result = kp(stage, "--comp", "digits", *QUICK_DIGITS)
        assert result.exit_code == 0, result.output
        for name in files:
            assert (work / stage / name).read_bytes() == (reference / "digits" / stage / name).read_bytes(), \
                f"{stage}/{name} differs after the rerun"
    assert not list(work.rglob(".tmp-*"))


def _sandbox(folder: Path) -> dict[Path, bytes]:
    """A user's files that kp must never touch: returns them with their bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {folder / "precious.txt": b"a user's notes", folder / ".tmp-notes.txt": b"mine, not kp's",
             folder / ".old-draft": b"also mine"}
    for path, data in files.items():
        path.write_bytes(data)
    return files


def _untouched(files: dict[Path, bytes]) -> bool:
    return all(path.is_file() and path.read_bytes() == data for path, data in files.items())


def test_kp_never_deletes_or_writes_in_a_work_folder_it_did_not_create(project, tmp_path):
    users = tmp_path / "users"
    files = _sandbox(users / "digits")  # paths.work pointed, by a slip, at a folder holding one named like the comp
    for command in (["clean"], ["split"], ["clean", "--stage", "split"]):
        result = kp(*command, "--comp", "digits", "--set", f"paths.work={users}")
        assert result.exit_code == 2, result.output
        assert "kp did not create it" in result.output and str(users / "digits") in result.output
        assert _untouched(files)
    assert sorted(p.name for p in (users / "digits").iterdir()) == [".old-draft", ".tmp-notes.txt", "precious.txt"]


def test_a_stage_folder_kp_did_not_write_is_refused_not_deleted(project):
    assert kp("split", "--comp", "digits").exit_code == 0
    work = project / "work" / "digits"
    files = _sandbox(work)  # the user's .tmp-/.old- files beside kp's: a run sweeps only names kp made
    (work / "split").unlink()  # the stage's link, replaced by a user's folder of the same name
    stage_files = _sandbox(work / "split")
    assert kp("split", "--comp", "digits", "--force").exit_code == 2
    result = kp("clean", "--comp", "digits", "--stage", "split")
    assert result.exit_code == 2 and "a folder kp did not write" in result.output
    assert _untouched(files) and _untouched(stage_files)
    for path in stage_files:
        path.unlink()
    (work / "split").rmdir()
    assert kp("split", "--comp", "digits").exit_code == 0  # restored from the run cache once the folder is gone
    assert _untouched(files)


def test_a_submission_name_may_not_overwrite_the_ledger(project):
    result = kp("submit", "--comp", "digits", "--set", "submit.name=ledger")
    assert result.exit_code == 2 and "would write over ledger.csv" in result.output


def test_a_class_without_training_rows_stops_at_download(project, tmp_path):
    folder = tmp_path / "dogscats"  # a dogs vs cats set without a single dog
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    for i in range(3):
        (folder / "train" / f"cat.{i}.jpg").write_bytes(image_bytes(i))
    (folder / "test" / "1.jpg").write_bytes(image_bytes(20))
    (folder / "sample_submission.csv").write_text("id,label\n1,0.5\n")
    result = kp("download", "--comp", "dogscats", "--set", f"download.source={folder}",
                "--set", "download.expected=[train, test, sample_submission.csv]")
    assert result.exit_code == 2 and "competition.classes ['dog'] have no training rows" in result.output


def test_a_sample_submission_that_disagrees_with_the_config_stops_at_download(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=2, classes=3, per_driver_class=3, test=2)
    statefarm_like_config(project, archive)
    result = kp("download", "--comp", "synth", "--set", "competition.classes=[c0, c2, c1]",
                "--set", "competition.submission_columns=[img, c0, c2, c1]")
    assert result.exit_code == 2 and "sample_submission.csv: its columns are ['img', 'c0', 'c1', 'c2']" in result.output
    result = kp("download", "--comp", "synth")
    assert result.exit_code == 0, result.output


def test_a_manifest_of_valid_json_with_wrong_kinds_is_treated_as_missing(project):
    assert kp("split", "--comp", "digits").exit_code == 0
    manifest = project / "work" / "digits" / "split" / "manifest.json"
    for broken in ({"outputs": "split.csv"}, {"fingerprint": 7}, {"metrics": [1]}, {"duration_s": "fast"}):
        good = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**good, **broken}))
        status = kp("status", "--comp", "digits")
        assert status.exit_code == 0 and "split       missing" in status.output, status.output
        assert kp("split", "--comp", "digits").exit_code == 0  # the stage reruns, as with no manifest
        assert json.loads(manifest.read_text())["outputs"]


def _dogscats_folder(folder: Path) -> Path:
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    for i in range(3):
        (folder / "train" / f"cat.{i}.jpg").write_bytes(image_bytes(i))
        (folder / "train" / f"dog.{i}.jpg").write_bytes(image_bytes(10 + i))
    (folder / "test" / "1.jpg").write_bytes(image_bytes(20))
    (folder / "sample_submission.csv").write_text("id,label\n1,0.5\n")
    return folder


def test_a_source_folder_may_not_lead_outside_itself_or_hold_the_work_folder(project, tmp_path):
    folder = _dogscats_folder(tmp_path / "dogscats")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the competition's")
    (folder / "train" / "dog.9.jpg").symlink_to(secret)
    args = ["download", "--comp", "dogscats", "--set", f"download.source={folder}",
            "--set", "download.expected=[train, test, sample_submission.csv]"]
    result = kp(*args)
    assert result.exit_code == 2 and "train/dog.9.jpg is a link to" in result.output and "outside" in result.output
    (folder / "train" / "dog.9.jpg").unlink()
    (folder / "train" / "dog.8.jpg").symlink_to(folder / "train" / "dog.0.jpg")  # inside: copied as a file
    assert kp(*args).exit_code == 0
    result = kp(*args, "--set", f"paths.work={folder / 'work'}", "--force")
    assert result.exit_code == 2 and "the source folder contains the work folder" in result.output
    (folder / "train" / "loop").symlink_to(folder)  # inside, but back up to the folder itself
    one_line_error(kp(*args, "--force"), "train/loop is a link to", "a folder that holds it: copying it would never end")
    (folder / "train" / "loop").unlink()
    os.mkfifo(folder / "train" / "dog.7.jpg")  # a copy would wait on it forever
    one_line_error(kp(*args, "--force"), "train/dog.7.jpg is neither a file nor a folder (a FIFO, socket or device)")


DIGITS_CHEAP = ["finetune.phases=[{epochs: 1, lr: 0.001}]", "ensemble.n=1"]


def _digits_cheap(root):
    from pipeline.engine import runner
    from pipeline.engine.config import load_config

    runner.run(load_config("digits", sets=DIGITS_CHEAP))


def _states(status_output: str) -> dict[str, str]:
    """Stage -> state from `kp status`'s table."""
    states = {}
    for line in status_output.splitlines():
        for state in ("up to date", "stale", "missing"):
            name, _, rest = line.partition("  ")
            if rest.strip().startswith(state):
                states[name.removesuffix(" *")] = state  # `*` marks the submitted stage
    return states


def test_an_output_changed_in_place_is_found_by_verify_and_rewritten_by_force(warm_project):
    root = warm_project("digits-cheap", _digits_cheap)
    sets = [arg for s in DIGITS_CHEAP for arg in ("--set", s)]
    work = root / "work" / "digits"
    features = work / "precompute" / "train.npy"
    trained = (work / "finetune" / "valid_probs.npy").read_bytes()
    good = features.read_bytes()
    header = len(good) - np.load(features, mmap_mode="r").nbytes
    features.write_bytes(good[:header] + bytes(len(good) - header))  # zeroed at the same size

    assert set(_states(kp("status", "--comp", "digits", *sets).output).values()) == {"up to date"}  # sizes only
    verified = kp("status", "--comp", "digits", *sets, "--verify")
    assert verified.exit_code == 1, verified.output
    assert "output train.npy changed since the run wrote it" in verified.output
    assert "damaged outputs in precompute" in verified.output

    forced = kp("finetune", "--comp", "digits", *sets, "--force")
    assert forced.exit_code == 0, forced.output
    assert "precompute: running (output train.npy changed since the run wrote it" in forced.output
    assert features.read_bytes() == good
    assert (work / "finetune" / "valid_probs.npy").read_bytes() == trained  # never trained on the zeros
    after = kp("status", "--comp", "digits", *sets, "--verify")
    assert after.exit_code == 0 and set(_states(after.output).values()) == {"up to date"}, after.output


def test_a_rerun_that_writes_different_bytes_makes_what_was_built_on_it_stale(warm_project):
    root = warm_project("digits-cheap", _digits_cheap)
    sets = [arg for s in DIGITS_CHEAP for arg in ("--set", s)]
    work = root / "work" / "digits"
    rerun = Manifest.read(work / "precompute")  # as a --force rerun that wrote other bytes leaves it
    rerun.digest = "0123456789abcdef"
    rerun.write(work / "precompute")
    status = kp("status", "--comp", "digits", *sets).output
    assert "upstream precompute was rerun and its outputs changed" in status
    # ensemble and finetune read precompute; submit reads ensemble, whose new outputs are not known before it reruns
    assert [name for name, state in _states(status).items() if state != "up to date"] == ["finetune", "ensemble",
                                                                                            "submit"]
    assert "upstream ensemble changed" in status
    rebuilt = kp("all", "--comp", "digits", *sets)
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "ensemble: running (upstream precompute was rerun and its outputs changed)" in rebuilt.output
    assert "finetune: running (upstream precompute was rerun" in rebuilt.output
    assert "submit: up to date" in rebuilt.output  # the retrained ensemble wrote the same bytes


def test_a_damaged_array_header_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "valid_probs.npy"
    np.save(path, np.zeros((10, 3), np.float32))
    path.write_bytes(b"garbage!" + path.read_bytes()[8:])
    with pytest.raises(PipelineError, match=r"valid_probs.npy: not a readable .npy array, its header is damaged"):
        load_array(path, in_memory=True)


def test_a_zip_bomb_stops_before_writing_and_the_rerun_is_clean(project, tmp_path):
    good = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, good)
    bomb = _outer_zip(good, tmp_path / "bomb.zip", images={"train/c0/img_1.jpg": bytes(256 << 20)})
    assert bomb.stat().st_size < 2 << 20  # 256 MiB declared in under 2 MB
    work = project / "work" / "synth"
    one_line_error(kp("download", "--comp", "synth", "--set", f"download.source={bomb}"),
                   f"imgs.zip in {bomb}: refusing to extract: member 'train/c0/img_1.jpg' declares 268,435,456 bytes",
                   "download.max_ratio=100")
    assert sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) < 10 * bomb.stat().st_size
    assert not list(work.rglob(".tmp-*"))
    assert kp("download", "--comp", "synth").exit_code == 0


def test_an_archive_larger_than_the_free_disk_is_refused_before_writing(project, tmp_path):
    good = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, good)
    big = _outer_zip(good, tmp_path / "big.zip", add={"sample_submission.csv.bak": np.random.default_rng(0).bytes(3 << 20)})
    with mounted_tmpfs(tmp_path / "small", "2m") as small:
        one_line_error(kp("download", "--comp", "synth", "--set", f"paths.work={small}",
                          "--set", f"download.source={big}", "--set", "download.expected=[]"),
                       f"{big}: refusing to extract: its members declare", "MB are free at")
        assert not list((small / "synth" / "_runs").rglob("*.csv"))  # nothing extracted


def test_members_the_layout_does_not_list_are_not_extracted(project, tmp_path):
    good = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, good)
    extra = _outer_zip(good, tmp_path / "extra.zip", add={"notes/huge.bin": b"x" * 1000})
    assert kp("download", "--comp", "synth", "--set", f"download.source={extra}").exit_code == 0
    assert not (project / "work" / "synth" / "download" / "raw" / "notes").exists()
    # what the layout names is unpacked even when `expected` leaves it out (the groups CSV here)
    result = kp("download", "--comp", "synth", "--set", f"download.source={extra}",
                "--set", "download.expected=[imgs.zip]")
    assert result.exit_code == 0, result.output
    assert (project / "work" / "synth" / "download" / "raw" / "driver_imgs_list.csv").is_file()


def _digits_folder(folder: Path) -> Path:
    """The digits competition's files as a folder `download.source` can name."""
    from pipeline.data.digits import write_digits_competition

    write_digits_competition(folder, folder.parent / "solution.csv")
    return folder


def test_a_config_file_that_is_not_utf8_is_named(project, tmp_path):
    overlay = tmp_path / "latin1.yaml"
    overlay.write_bytes("# réglages\nsplit:\n  fraction: 0.3\n".encode("latin-1"))
    one_line_error(kp("status", "--comp", "digits", "--config", str(overlay)),
                   f"{overlay}: not UTF-8 text (byte 0xe9 on line 1)")


@pytest.mark.parametrize("row, fragment", [
    ("2026-01-01,a.csv,fp,random,holdout,accuracy,0.9,high,,complete,7,,x,csv",
     "line 2, column lb_score: 'high' is not a number"),
    ("2026-01-01,a.csv,fp", "line 2 has 3 fields, the header has 14"),
])
def test_a_ledger_with_a_bad_row_is_one_line_in_ledger_and_status(project, row, fragment):
    from pipeline.kaggle.ledger import COLUMNS

    ledger = project / "submissions" / "digits" / "ledger.csv"
    ledger.parent.mkdir(parents=True)
    text = ",".join(COLUMNS) + "\n" + row + "\n"
    ledger.write_text(text)
    one_line_error(kp("ledger", "--comp", "digits"), str(ledger), fragment)
    one_line_error(kp("status", "--comp", "digits", *CHEAP), str(ledger), fragment)
    assert ledger.read_text() == text


def test_damaged_run_records_do_not_break_status(warm_project):
    root = warm_project("digits-cheap", _digits_cheap)
    sets = [arg for s in DIGITS_CHEAP for arg in ("--set", s)]
    runs = root / "work" / "digits" / "_runs"
    (runs / "split" / "last.json").write_text("[1, 2")
    (runs / "finetune" / "last.json").write_text('["not", "an", "object"]')
    result = kp("status", "--comp", "digits", *sets)
    assert result.exit_code == 0 and set(_states(result.output).values()) == {"up to date"}, result.output


@pytest.mark.parametrize("damage, fragment", [
    ("extra field", "line 4 has 66 fields, the header has 65"),
    ("latin-1 sample", "sample_submission.csv: not UTF-8 text (byte 0xe9 on line 2)"),
])
def test_a_csv_from_the_competition_that_does_not_parse_names_the_file_and_line(project, tmp_path, damage, fragment):
    folder = _digits_folder(tmp_path / "digits")
    if damage == "extra field":
        lines = (folder / "train.csv").read_text().splitlines()
        lines[3] += ",0"
        (folder / "train.csv").write_text("\n".join(lines) + "\n")
    else:
        sample = folder / "sample_submission.csv"
        sample.write_bytes(sample.read_bytes().replace(b"\n1,", "\n1é,".encode("latin-1"), 1))
    error = one_line_error(kp("download", "--comp", "digits", "--set", f"download.source={folder}"), fragment)
    assert str(folder) in error and TMP_PREFIX not in error


def test_a_blank_group_names_its_rows(project, tmp_path):
    good = make_statefarm_like(tmp_path / "data")
    with zipfile.ZipFile(good) as zf:
        rows = zf.read("driver_imgs_list.csv").decode().splitlines()
    rows[3] = "," + rows[3].split(",", 1)[1]  # the driver of the third image left blank
    blank = _outer_zip(good, tmp_path / "blank.zip", text={"driver_imgs_list.csv": "\n".join(rows) + "\n"})
    statefarm_like_config(project, good)
    error = one_line_error(kp("download", "--comp", "synth", "--set", f"download.source={blank}"),
                           f"{blank} member driver_imgs_list.csv: 1 training images have a blank 'subject' (lines [4]")
    assert TMP_PREFIX not in error


@pytest.mark.parametrize("setting, fragment", [
    ("split.seed=-1", "split.seed: bad value -1"),
    ("split.fraction=1e-9", "split.fraction=1e-09 holds out 1 of the 1,497 training rows"),
    ("split.fraction=0.999", "split.fraction=0.999 holds out 1,496 of the 1,497 training rows and keeps 1"),
])
def test_split_settings_the_data_cannot_satisfy_are_refused_before_anything_runs(warm_project, setting, fragment):
    root = warm_project("digits-cheap", _digits_cheap)
    split = (root / "work" / "digits" / "split").resolve()
    one_line_error(kp("status", "--comp", "digits", "--set", setting), fragment)
    one_line_error(kp("all", "--comp", "digits", "--set", setting), fragment)
    assert (root / "work" / "digits" / "split").resolve() == split  # nothing ran
    one_line_error(kp("status", "--comp", "digits", "--set", "split.strategy=kfold", "--set", "split.folds=5000"),
                   "split.folds=5000: more folds than the 152 rows of the largest class")


def test_a_key_yaml_glued_to_its_value_is_explained(project):
    result = kp("status", "--comp", "digits", "--set", "finetune.phases=[{epochs:0,lr:0.1}]")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "finetune.phases.0.epochs:0: unknown key (did you mean 'epochs'?) (YAML reads 'epochs:0' as one key: put " \
           "a space after the colon); allowed keys here: epochs, lr" in result.output, result.output


def test_an_exif_orientation_is_counted_in_a_warning(project, tmp_path):
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees for display
    Image.new("RGB", (16, 12), (200, 10, 10)).save(buffer, format="JPEG", exif=exif.tobytes())
    statefarm_like_config(project, make_statefarm_like(tmp_path / "data", replaced={"img_3.jpg": buffer.getvalue()}))
    result = kp("download", "--comp", "synth")
    assert result.exit_code == 0, result.output
    report = Manifest.read(project / "work" / "synth" / "download")
    assert any("1 images carry an EXIF orientation" in w and "img_3.jpg" in w for w in report.warnings), report.warnings


def test_a_saved_model_safe_mode_refuses_or_that_is_damaged_is_one_line(tmp_path):
    import keras

    from pipeline.models.saved import load_saved_model

    inputs = keras.Input((4,))
    lambda_model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    lambda_model.save(tmp_path / "lambda.keras")
    with pytest.raises(PipelineError, match=r"lambda.keras: holds a Lambda layer .* refuses to load"):
        load_saved_model(tmp_path / "lambda.keras")
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    plain.save(tmp_path / "model.keras")
    (tmp_path / "model.keras").write_bytes((tmp_path / "model.keras").read_bytes()[:300])
    with pytest.raises(PipelineError, match=r"model.keras: not a readable .keras model file \(truncated or damaged"):
        load_saved_model(tmp_path / "model.keras")


def test_a_truncated_weights_file_says_it_is_not_hdf5(tmp_path):
    from pipeline.models.backbones import build_feature_model

    weights = tmp_path / "mobilenet.h5"
    weights.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))
    with pytest.raises(PipelineError, match=r"precompute.weights .*mobilenet.h5: not an HDF5 weights file Keras can "
                                            r"read \(truncated or damaged"):
        build_feature_model("mobilenet", str(weights), (32, 32, 3), "pool", alpha=0.25)


def test_csvs_saved_with_a_byte_order_mark_are_read_as_utf8(project, tmp_path):
    folder = _digits_folder(tmp_path / "digits")
    for name in ("sample_submission.csv", "train.csv"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())  # as Excel saves UTF-8
    result = kp("download", "--comp", "digits", "--set", f"download.source={folder}")
    assert result.exit_code == 0, result.output


def test_a_config_of_nested_aliases_is_refused_before_it_expands(project, tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]  # 9**12 items if expanded
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("\n".join(lines) + "\nsplit:\n  fraction: 0.3\n")
    one_line_error(kp("status", "--comp", "digits", "--config", str(bomb)),
                   f"{bomb}:", "its aliases (*name) expand to more than 100,000 values: refused")


def test_a_latin1_byte_deep_in_a_table_is_named_by_its_own_line(tmp_path):
    from pipeline.core.readers import read_table

    table = tmp_path / "train.csv"
    table.write_bytes(b"id,label\n" + b"".join(b"%d,0\n" % i for i in range(5000)) + "caf\u00e9,1\n".encode("latin-1"))
    with pytest.raises(PipelineError, match=r"train.csv: not UTF-8 text \(byte 0xe9 on line 5002\)"):
        read_table(table)


def test_a_no_op_code_edit_reruns_no_feature_pass_and_keeps_the_submission(warm_project, tmp_path, monkeypatch):
    """A new function in kaggle/api.py makes download rerun, which writes the same files: nothing after it runs
    again (no pass over the images) and the submission keeps its bytes; a comment in stages/precompute.py changes
    nothing; a real change to what precompute computes (pipeline/data/pixels.py) makes it stale."""
    from pipeline.core.artifacts import SUBMISSION_FILE
    from pipeline.engine import runner
    from pipeline.engine.config import load_config
    from pipeline.engine.status import UP_TO_DATE, stage_statuses
    from tests.test_cache import _code_copy, _edit

    warm_project("digits-cheap", _digits_cheap)
    config = load_config("digits", sets=DIGITS_CHEAP)
    submission = (config.work_dir / "submit" / SUBMISSION_FILE).read_bytes()
    copy = _code_copy(tmp_path, monkeypatch)
    api = copy / "pipeline" / "kaggle" / "api.py"
    api.write_text(api.read_text() + "\n\ndef a_helper_nothing_calls():\n    return None\n")
    _edit(copy / "stages" / "precompute.py", "\ndef run(", "\n# a comment\ndef run(")
    stale = {s.name: s.reasons for s in stage_statuses(config) if s.state != UP_TO_DATE}
    assert stale["download"] == ["code changed: pipeline/kaggle/api.py"]
    assert stale["precompute"] == ["upstream download changed"]  # known only once download has rerun
    actions = {}
    runner.run(config, actions=actions)
    assert actions == {"download": "ran", "precompute": "skipped", "split": "skipped", "finetune": "skipped",
                       "ensemble": "skipped", "submit": "skipped"}
    assert (config.work_dir / "submit" / SUBMISSION_FILE).read_bytes() == submission
    pixels = copy / "pipeline" / "data" / "pixels.py"
    pixels.write_text(pixels.read_text() + "EDITED = True\n")
    stale = {s.name: s.reasons for s in stage_statuses(config) if s.state != UP_TO_DATE}
    assert stale["precompute"] == ["code changed: pipeline/data/pixels.py"] and "download" not in stale


def test_config_values_python_cannot_hold_are_one_line_naming_where(project, tmp_path):
    huge = "9" * 5000
    one_line_error(kp("status", "--comp", "digits", "--set", f"split.seed={huge}"),
                   "--set split.seed=9999", "(5,011 characters): a value YAML cannot turn into Python's (Exceeds the "
                                            "limit (4300 digits) for integer string conversion")
    deep = tmp_path / "deep.yaml"
    deep.write_text("split:\n  fraction: 0.3\nnest: " + "[" * 3000 + "]" * 3000 + "\n")
    one_line_error(kp("status", "--comp", "digits", "--config", str(deep)), f"{deep}: nested too deeply to read")
    big = tmp_path / "big.yaml"
    big.write_text("lists:\n" + "  - [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" * 60_000)  # 2 MB of plain lists, no alias
    one_line_error(kp("status", "--comp", "digits", "--config", str(big)),
                   f"{big}: 2,160,007 bytes, more than a config holds (1,048,576", "refused before it is read")
    one_line_error(kp("status", "--comp", "digits", "--set", "features={lite: {nope: 1}}"),
                   "features.lite.nope: unknown key; allowed keys here: alpha, backbone, cut, image_size, preprocess, "
                   "weights")
    named = tmp_path / "nul.yaml"
    named.write_text('submit:\n  name: "a\\0b"\n')
    one_line_error(kp("status", "--comp", "digits", "--config", str(named)),
                   "submit.name: bad value 'a\\x00b'", "must be a plain file name: it holds a control character")


def test_a_weights_path_that_is_a_folder_or_not_a_weights_file_is_named(tmp_path):
    from pipeline.models.backbones import build_feature_model, resolve_weights

    (tmp_path / "weights").mkdir()
    with pytest.raises(PipelineError, match=r"precompute.weights 'weights': .*/weights is a folder; give the weights "
                                            r"file in it"):
        resolve_weights("weights", tmp_path)
    text = tmp_path / "mobilenet.keras"
    text.write_text("not a model\n")
    with pytest.raises(PipelineError, match=r"precompute.weights .*mobilenet.keras: not a .keras file Keras can read"):
        build_feature_model("mobilenet", resolve_weights(str(text), tmp_path), (32, 32, 3), "pool", alpha=0.25)


def test_a_file_where_the_training_curves_go_names_the_setting_that_turns_them_off(warm_project):
    root = warm_project("digits-cheap", _digits_cheap)
    curves = root / "work" / "digits" / "_tensorboard"
    shutil.rmtree(curves, ignore_errors=True)
    curves.write_text("a file where kp keeps its curves")
    sets = [arg for s in DIGITS_CHEAP for arg in ("--set", s)] + ["--set", "finetune.phases=[{epochs: 1, lr: 0.002}]"]
    one_line_error(kp("finetune", "--comp", "digits", *sets),  # a model not trained before: its curves go there
                   f"{curves} is a file, in the way of the training curves' folder", "compute.tensorboard: false")
    assert kp("finetune", "--comp", "digits", *sets, "--set", "compute.tensorboard=false").exit_code == 0


def test_kp_outside_a_project_says_where_it_looked_instead_of_using_another(tmp_path, monkeypatch):
    monkeypatch.delenv("KP_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    one_line_error(kp("status", "--comp", "digits"), f"no configs/defaults.yaml in {tmp_path.resolve()} or any folder "
                                                     "above it: run kp inside a project folder")
    monkeypatch.setenv("KP_ROOT", str(tmp_path))
    one_line_error(kp("status", "--comp", "digits"), f"KP_ROOT={tmp_path.resolve()}: no configs/defaults.yaml there")
