"""Archive extraction: path traversal refused, nested archives unpacked, corrupt archives named."""
from __future__ import annotations

import zipfile

import pytest

from pipeline.core.errors import PipelineError
from pipeline.data.archive import extract_nested, extract_zip, list_members
from tests.helpers import nested_zip


def _zip(path, members: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("evil", ["../evil.txt", "train/../../evil.txt", "/tmp/kp-evil-absolute.txt"])
def test_traversal_is_refused_before_anything_is_written(tmp_path, evil):
    archive = _zip(tmp_path / "bad.zip", {"ok.txt": b"fine", evil: b"owned"})
    dest = tmp_path / "a" / "dest"
    with pytest.raises(PipelineError) as caught:
        extract_zip(archive, dest)
    assert "refusing to extract" in str(caught.value) and evil in str(caught.value)
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (dest / "ok.txt").exists()  # checked before the first byte is written


def test_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("innocent")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(PipelineError, match="symbolic link"):
        extract_zip(archive, tmp_path / "dest")


def test_nested_archives_are_extracted_in_place_and_removed(tmp_path):
    inner = nested_zip({"train/cat.1.jpg": b"x", "train/dog.2.jpg": b"y"})
    outer = _zip(tmp_path / "comp.zip", {"train.zip": inner, "sample_submission.csv": b"id,label\n"})
    dest = tmp_path / "raw"
    assert extract_zip(outer, dest) == 2
    assert extract_nested(dest) == {"train.zip": 2}
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "sample_submission.csv", "train/cat.1.jpg", "train/dog.2.jpg"]


def test_corrupt_and_truncated_archives_are_named(tmp_path):
    good = _zip(tmp_path / "good.zip", {f"f{i}.txt": bytes(1000) for i in range(20)})
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"this is not a zip file at all" * 10)
    for broken in (truncated, garbage):
        with pytest.raises(PipelineError, match=rf"{broken.name}: (not a readable|corrupt or truncated) zip"):
            list_members(broken)
        with pytest.raises(PipelineError, match=rf"{broken.name}: corrupt or truncated zip"):
            extract_zip(broken, tmp_path / "out")


def test_bad_member_crc_is_reported(tmp_path):
    archive = _zip(tmp_path / "crc.zip", {"data.bin": b"A" * 5000})
    raw = bytearray(archive.read_bytes())
    offset = raw.find(b"A" * 100)  # stored uncompressed: flip a byte of the member's data
    raw[offset] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match="crc.zip: corrupt or truncated zip archive"):
        extract_zip(archive, tmp_path / "out")


def test_missing_archive(tmp_path):
    with pytest.raises(PipelineError, match="archive not found"):
        extract_zip(tmp_path / "nope.zip", tmp_path / "out")


def _bomb(path, name="zeros.bin", size=64 << 20):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, bytes(size))
    return path


def test_a_zip_bomb_is_refused_before_a_byte_is_written(tmp_path):
    archive = _bomb(tmp_path / "bomb.zip")  # 64 MiB of zeros in about 64 KB: 1,000x
    dest = tmp_path / "dest"
    with pytest.raises(PipelineError, match=r"bomb.zip: refusing to extract: member 'zeros.bin' declares 67,108,864 "
                                            r"bytes from .* above download.max_ratio=100\)"):
        extract_zip(archive, dest)
    assert not any(dest.rglob("*"))
    assert extract_zip(archive, dest, max_ratio=2000) == 1  # the limit is the config's to raise
    assert (dest / "zeros.bin").stat().st_size == 64 << 20


def test_a_member_that_yields_more_than_it_declares_is_cut_at_its_declared_size(tmp_path):
    archive = _bomb(tmp_path / "liar.zip", size=8 << 20)
    raw = bytearray(archive.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = raw.find(signature) + offset
        raw[at:at + 4] = (1000).to_bytes(4, "little")  # "1,000 bytes", the stream inflates to 8 MiB
    archive.write_bytes(bytes(raw))
    with pytest.raises(PipelineError, match="liar.zip: corrupt or truncated zip archive"):
        extract_zip(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "zeros.bin").stat().st_size <= 1000


def test_only_the_listed_members_are_extracted_and_nested_ones_are_named_by_their_archive(tmp_path):
    inner = nested_zip({"train/a.jpg": b"x"})
    outer = _zip(tmp_path / "comp.zip", {"train.zip": inner, "sample_submission.csv": b"id\n", "extra/big.bin": b"y"})
    dest = tmp_path / "raw"
    assert extract_zip(outer, dest, only=["train.zip", "sample_submission.csv"]) == 2
    assert not (dest / "extra").exists()
    (dest / "train.zip").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match=r"^train.zip in .*comp.zip: corrupt or truncated"):
        extract_nested(dest, inside=str(outer))


def test_an_archive_of_too_many_members_is_refused_before_a_byte_is_written(tmp_path):
    archive = _zip(tmp_path / "many.zip", {f"empty/{i}.txt": b"" for i in range(50)})
    with pytest.raises(PipelineError, match=r"many.zip: refusing to extract: it holds 50 members, more than "
                                            r"download.max_members=40"):
        extract_zip(archive, tmp_path / "dest", max_members=40)
    assert not (tmp_path / "dest" / "empty").exists()
    assert extract_zip(archive, tmp_path / "dest", max_members=50) == 50
