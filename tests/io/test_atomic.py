import os

import pytest

from medfm.io import atomic_path, atomic_write_bytes, atomic_write_text, remove_temp_files


def test_temp_name_keeps_ending_and_is_hidden(tmp_path):
    target = tmp_path / "sub" / "case_0000.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.parent.is_dir()
        assert tmp.name.startswith(".case_0000.tmp-") and tmp.name.endswith(".nii.gz")
        assert str(os.getpid()) in tmp.name
        tmp.write_bytes(b"abc")
        assert not target.exists()
    assert target.read_bytes() == b"abc"
    assert os.listdir(target.parent) == ["case_0000.nii.gz"]


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_existing_target(tmp_path):
    target = tmp_path / "dataset.json"
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["dataset.json"]


def test_write_bytes_and_text_replace(tmp_path):
    target = tmp_path / "a" / "b" / "blob.bin"
    atomic_write_bytes(target, b"\x00\x01")
    atomic_write_bytes(target, b"\x02")
    assert target.read_bytes() == b"\x02"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"


def test_remove_temp_files_only_touches_this_targets_leftovers(tmp_path):
    target = tmp_path / "c1_0000.png"
    stale = tmp_path / ".c1_0000.tmp-123-0123abcd.png"
    other = tmp_path / ".c10_0000.tmp-123-0123abcd.png"
    keep = tmp_path / ".c1_0000.notes.png"
    for p in (stale, other, keep):
        p.write_bytes(b"")
    assert remove_temp_files(target) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, keep.name])
