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


def test_atomic_folder_swaps_a_whole_folder_in(tmp_path):
    from medfm.io import atomic_folder

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    (target / "model.safetensors").write_bytes(b"old weights")
    with atomic_folder(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        (tmp / "config.json").write_text("new")
        assert (target / "config.json").read_text() == "old"  # old whole until the new is
    assert sorted(os.listdir(target)) == ["config.json"]  # the old folder is gone, not merged
    assert (target / "config.json").read_text() == "new"
    assert os.listdir(tmp_path) == ["model"]  # no temporary or old folder left


def test_a_failed_atomic_folder_keeps_the_old_one(tmp_path):
    from medfm.io import atomic_folder

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "config.json").write_text("half")
            raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["model"]
    with atomic_folder(tmp_path / "new" / "m") as tmp:  # a new folder, parents made
        (tmp / "a").write_text("a")
    assert (tmp_path / "new" / "m" / "a").read_text() == "a"
