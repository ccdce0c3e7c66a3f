"""medfm.io.paths: outputs checked before any work (never an input, never replaced unasked,
always writable), each refusal one MedfmError line naming the option and the path."""

import os

import pytest

from medfm.errors import MedfmError
from medfm.io import check_new, check_outputs, check_writable


def test_an_output_inside_an_input_is_refused(tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    with pytest.raises(MedfmError, match=r"--out .*dataset.json lies inside the input --data"):
        check_outputs({"--out": data / "dataset.json"}, {"--data": data})
    with pytest.raises(MedfmError, match="is the input --image"):
        check_outputs({"--out": tmp_path / "x.png"}, {"--image": tmp_path / "x.png"})
    check_outputs({"--out": tmp_path / "r.json", "--overlays": None}, {"--data": data})


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    with pytest.raises(MedfmError) as e:
        check_new(report, "--out")
    assert str(e.value) == (
        f"--out {report} exists; pass --overwrite to replace it, or give a new file"
    )
    assert check_new(report, "--out", overwrite=True) == report
    model = tmp_path / "model"
    model.mkdir()
    assert check_new(model, "--out", folder=True) == model  # an empty folder is new
    (model / "config.json").write_text("{}")
    with pytest.raises(MedfmError, match="exists; pass --overwrite to replace it, or give a new "
                                         "folder"):  # fmt: skip
        check_new(model, "--out", folder=True)
    assert check_new(model, "--out", folder=True, overwrite=True) == model
    assert check_new(None, "--overlay") is None
    assert report.read_text() == "{}" and os.listdir(model) == ["config.json"]  # untouched


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("mask.xyz", {"endings": (".png", ".nii", ".nii.gz")},
         "must end in .png, .nii or .nii.gz; rename the output"),
        ("REPORT.JSON.txt", {"endings": (".json",)}, "must end in .json"),
        ("folder", {"endings": (".png",)}, "is a folder; give a file name"),
        ("file", {"folder": True}, "is a file; give a folder"),
    ],
)  # fmt: skip
def test_wrong_kinds_and_endings_are_refused(tmp_path, name, kwargs, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedfmError, match=message):
        check_new(tmp_path / name, "--out", overwrite=True, **kwargs)
    check_new(tmp_path / "new" / "MASK.NII.GZ", "--out", endings=(".nii.gz",))  # any case


def test_unwritable_places_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MedfmError) as e:
        check_writable(blocker / "sub" / "m.png", "--out")
    assert (
        str(e.value) == f"cannot write --out {blocker}/sub/m.png: {blocker} is a file, not a folder"
    )
    with pytest.raises(MedfmError, match="cannot write --out /proc/x.png: /proc is not writable"):
        check_new("/proc/x.png", "--out", endings=(".png",))
    check_writable(tmp_path / "a" / "b" / "c.png", "--out")  # made later by the writer
    assert sorted(os.listdir(tmp_path)) == ["file"]  # the probe leaves nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(MedfmError, match="is not writable"):
            check_writable(ro / "m.png", "--out")
        with pytest.raises(MedfmError, match="is not writable"):
            check_new(ro, "--overlays", folder=True)
    finally:
        ro.chmod(0o755)
