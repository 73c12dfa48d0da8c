"""The download stage on synthetic Kaggle-layout archives and on the real mini-competitions."""
from __future__ import annotations

import shutil
import zipfile

import pandas as pd
import pytest

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.data.index import INDEX_COLUMNS, read_index
from pipeline.engine import runner
from pipeline.engine.config import load_config
from tests.helpers import (COMPETITIONS, REPO, image_bytes, make_statefarm_like, needs_shared_data,
                            nested_zip, statefarm_like_config, write_config)


def _run(comp="synth", sets=(), extra=()):
    config = load_config(comp, sets=list(sets), extra_files=list(extra))
    runner.run(config, ["download"])
    return config, read_index(config.work_dir / "download" / "index.csv")


def test_class_folders_with_groups(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=2, test=5)
    statefarm_like_config(project, archive)
    config, index = _run()
    assert list(index.columns) == INDEX_COLUMNS
    train, test = index[index.subset == "train"], index[index.subset == "test"]
    assert len(train) == 24 and len(test) == 5
    assert set(train.group) == {"p000", "p001", "p002", "p003"}
    row = train[train.id == "img_7.jpg"].iloc[0]  # driver 1 (images 6..11), class 0 (6, 7)
    assert (row.path, row.label, row.group) == ("train/c0/img_7.jpg", "c0", "p001")
    sample = pd.read_csv(config.work_dir / "download" / "raw" / "sample_submission.csv")
    assert test.id.tolist() == sample.img.tolist()  # test rows in sample-submission order
    assert not list((config.work_dir / "download" / "raw").glob("*.zip"))  # nested imgs.zip unpacked
    assert Manifest.read(config.work_dir / "download").metrics["n_groups"] == 4


def test_undecodable_images_are_skipped_with_a_warning_or_fail(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=2, classes=2, per_driver_class=3,
                                  broken={"img_4.jpg"})
    statefarm_like_config(project, archive, classes=2)
    config, index = _run()
    assert "img_4.jpg" not in set(index.id) and len(index[index.subset == "train"]) == 11
    manifest = Manifest.read(config.work_dir / "download")
    assert manifest.metrics["bad_items"][0]["path"] == "train/c1/img_4.jpg"
    assert "skipped 1 undecodable items: train/c1/img_4.jpg" in manifest.warnings[0]
    with pytest.raises(PipelineError, match=r"1 undecodable items \(download.bad_images=fail\): train/c1/img_4.jpg"):
        _run(sets=["download.bad_images=fail"])


def test_missing_expected_member_is_named(project, tmp_path):
    archive = tmp_path / "partial.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("imgs.zip", nested_zip({"train/c0/img_0.jpg": image_bytes(0)}))
        zf.writestr("sample_submission.csv", "img,c0,c1,c2\n")
    statefarm_like_config(project, archive)
    with pytest.raises(PipelineError) as caught:
        _run()
    assert "partial.zip: missing expected member(s) ['driver_imgs_list.csv'] (download.expected)" in str(caught.value)
    assert "it has: imgs.zip, sample_submission.csv" in str(caught.value)


def test_wrong_csv_header_is_named(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data")
    # rewrite driver_imgs_list.csv with a wrong header
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "driver_imgs_list.csv":
                data = data.replace(b"subject,classname,img", b"driver,class,file")
            dst.writestr(item, data)
    statefarm_like_config(project, bad)
    with pytest.raises(PipelineError, match=r"driver_imgs_list.csv: wrong header: expected columns "
                                            r"img,classname,subject; found driver,class,file"):
        _run()


def test_pixels_csv_wrong_header_and_bad_rows(project, tmp_path):
    folder = tmp_path / "digits"
    header = "label," + ",".join(f"pixel{i}" for i in range(4))
    folder.mkdir()
    (folder / "train.csv").write_text(f"{header}\n1,0,255,3,4\n2,0,0,x,0\n1,0,300,0,0\n2,1,1,1,1\n")
    (folder / "test.csv").write_text("pixel0,pixel1,pixel2,pixel3\n1,2,3,4\n")
    (folder / "sample_submission.csv").write_text("ImageId,Label\n1,0\n")
    write_config(project, "tiny", f"""
competition: {{slug: tiny, classes: ["1", "2"], id_column: ImageId, submission_columns: [ImageId, Label],
              metric: accuracy, image_size: [2, 2], channels: 1}}
download: {{source: {folder}, layout: pixels_csv, expected: [train.csv, test.csv, sample_submission.csv]}}
""")
    _, index = _run("tiny")
    assert index[index.subset == "train"].row.tolist() == [0, 3]  # rows 1 (non-numeric) and 2 (300) skipped
    (folder / "test.csv").write_text("p0,p1,p2,p3\n1,2,3,4\n")
    with pytest.raises(PipelineError, match=r"test.csv: wrong header: expected pixel0,pixel1,pixel2,pixel3"):
        _run("tiny")


def test_test_ids_without_an_image_are_named(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", test=3)
    statefarm_like_config(project, archive)
    with pytest.raises(PipelineError, match=r"3 of 3 test ids have no image \(looked for test/\{id\}.png\)"):
        _run(sets=["download.test_file='{id}.png'"])


def test_folder_source_and_filename_labels_layout(project, tmp_path):
    folder = tmp_path / "dogscats"
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    for i in range(3):
        (folder / "train" / f"cat.{i}.jpg").write_bytes(image_bytes(i))
        (folder / "train" / f"dog.{i}.jpg").write_bytes(image_bytes(10 + i))
    for i in (2, 1):
        (folder / "test" / f"{i}.jpg").write_bytes(image_bytes(20 + i))
    (folder / "sample_submission.csv").write_text("id,label\n2,0.5\n1,0.5\n")
    _, index = _run("dogscats", sets=[f"download.source={folder}", "download.expected=[train, test, sample_submission.csv]"])
    train = index[index.subset == "train"]
    assert train.label.value_counts().to_dict() == {"cat": 3, "dog": 3}
    assert index[index.subset == "test"].path.tolist() == ["test/2.jpg", "test/1.jpg"]


def test_missing_local_source(project):
    with pytest.raises(PipelineError, match=r"download.source '/nonexistent/x.zip': /nonexistent/x.zip does not exist"):
        _run("dogscats", sets=["download.source=/nonexistent/x.zip"])


def test_kaggle_source_without_credentials_says_where_it_looked(project, tmp_path, monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    with pytest.raises(PipelineError) as caught:
        _run("dogscats")
    message = str(caught.value)
    assert "Kaggle credentials not found" in message
    assert str(tmp_path / "kaggle-config" / "kaggle.json") in message
    assert not (project / "work" / "dogscats" / "download").exists()


def test_digits_is_written_in_kaggle_layout(project):
    config, index = _run("digits")
    raw = config.work_dir / "download" / "raw"
    train = pd.read_csv(raw / "train.csv")
    assert list(train.columns[:2]) == ["label", "pixel0"] and train.shape == (1497, 65)
    assert train.iloc[:, 1:].to_numpy().max() == 255
    assert pd.read_csv(raw / "sample_submission.csv").columns.tolist() == ["ImageId", "Label"]
    assert len(index[index.subset == "test"]) == 300
    solution = pd.read_csv(config.work_dir / "download" / "solution.csv")
    assert solution.Label.nunique() == 10  # held-out labels, outside raw/


@needs_shared_data
@pytest.mark.realdata
@pytest.mark.parametrize("comp, n_train, n_test, n_groups", [
    ("statefarm", 14349, 2860, 16),
    ("dogscats", 1400, 200, 0),
    ("mnist", 7000, 1000, 0),
])
def test_real_mini_competitions(project, comp, n_train, n_test, n_groups):
    shutil.copytree(REPO / "configs" / "offline", project / "configs" / "offline", dirs_exist_ok=True)
    overlay = project / "configs" / "offline" / f"{comp}.yaml"
    source = load_config(comp, root=REPO, extra_files=[REPO / "configs" / "offline" / f"{comp}.yaml"]).get("download.source")
    config, index = _run(comp, extra=[overlay], sets=[f"download.source={(REPO / source).resolve()}"])
    counts = Manifest.read(config.work_dir / "download").metrics
    assert (counts["n_train"], counts["n_test"], counts["n_groups"]) == (n_train, n_test, n_groups)
    assert counts["bad_items"] == []
    assert index.id[index.subset == "test"].tolist() == pd.read_csv(
        config.work_dir / "download" / "raw" / "sample_submission.csv", dtype=str)[config.competition.id_column].tolist()
    assert COMPETITIONS.is_dir()


def test_an_archive_written_on_windows_keeps_every_image_and_what_is_left_out_is_named(project, tmp_path, capsys):
    """Windows zip tools name members `train\\cat.1.jpg`: the backslash is read as the separator (half of this
    archive's images would otherwise land at the top level, unindexed); files the index leaves out are counted."""
    train = {"train\\notes.txt": b"kept by hand"}
    for i in range(6):
        separator = "\\" if i % 2 else "/"
        train[f"train{separator}cat.{i}.jpg"] = image_bytes(i)
        train[f"train{separator}dog.{i}.jpg"] = image_bytes(10 + i)
    test = {"test/1.jpg": image_bytes(30), "test/2.jpg": image_bytes(31), "test\\3.jpg": image_bytes(32)}
    members = {"sample_submission.csv": b"id,label\n1,0.5\n2,0.5\n", "train.zip": nested_zip(train),
               "test.zip": nested_zip(test)}
    archive = tmp_path / "dogscats.zip"
    archive.write_bytes(nested_zip(members))
    config, index = _run("dogscats", sets=[f"download.source={archive}"])
    assert index[index.subset == "train"].label.value_counts().to_dict() == {"cat": 6, "dog": 6}
    assert index[index.subset == "test"].path.tolist() == ["test/1.jpg", "test/2.jpg"]
    assert "indexed: cat 6, dog 6 training images; 2 test" in capsys.readouterr().err
    assert any("2 files under raw/ are not in the index" in w and "'test/3.jpg', 'train/notes.txt'" in w
               for w in Manifest.read(config.work_dir / "download").warnings)
