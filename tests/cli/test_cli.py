"""The ``medfm`` command: exit codes, one-line errors, generate / preview / info."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from medfm.cli.main import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_is_instant_and_lists_commands():
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "synth" in r.stdout and "info" in r.stdout
    # heavy modules are imported inside commands only
    probe = "import sys, medfm.cli.main; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_info_prints_versions_and_devices():
    r = run("info")
    assert r.exit_code == 0
    assert "torch" in r.output and "devices" in r.output and "threads" in r.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--modality", "ct,xray"], "unknown modality xray"),
        (["--size", "16"], "too small"),
        (["--size", "64x"], "--size"),
        (["--dim", "3", "--size", "64,64"], "3D size"),
        (["--dim", "4"], "--dim"),
        (["--shard", "3/2"], "invalid"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, extra, message):
    out = tmp_path / "ds"
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "synth", "generate", "--out", str(out), *extra],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("synth", "generate", "--out", blocker / "ds", "-n", "1", "--size", "32")
    assert r.exit_code == 2 and "cannot write" in r.output


def test_generate_preview_and_rerun(tmp_path):
    out = tmp_path / "ds"
    args = ["synth", "generate", "--out", out, "-n", "3", "--size", "48", "--preview"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "3 cases written" in r.output
    img = np.asarray(Image.open(out / "preview.png"))
    assert img.ndim == 3 and img.shape[0] > 100
    # coloured outline pixels are drawn (r, g, b differ)
    assert (np.ptp(img.astype(int), axis=2) > 60).sum() > 10
    r = run(*args)
    assert r.exit_code == 0 and "0 cases written, 3 already there" in r.output
    r = run("synth", "generate", "--out", out, "-n", "4", "--size", "48")
    assert r.exit_code == 2 and "different arguments" in r.output


def test_preview_command(tmp_path):
    out = tmp_path / "ds"
    assert (
        run(
            "synth",
            "generate",
            "--out",
            out,
            "-n",
            "2",
            "--size",
            "40",
            "--dim",
            "3",
            "--modality",
            "mri",
        ).exit_code
        == 0
    )
    r = run("synth", "preview", out, "--out", tmp_path / "grid.png")
    assert r.exit_code == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[1] >= 3 * 100  # three orthogonal slices for a 3D case
    r = run("synth", "preview", tmp_path / "missing")
    assert r.exit_code == 2 and "not a folder" in r.output


def test_validation_errors_become_one_line():
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

    from medfm.errors import validation_message

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        refine_iters: int = Field(0, ge=0)

    class Cfg(BaseModel):
        model_config = ConfigDict(extra="forbid")
        grad_clip: float | None = Field(None, gt=0)
        prompt: Inner = Inner()

        @model_validator(mode="after")
        def _check(self):
            if self.grad_clip == 7:
                raise ValueError("seven is not a clip")
            return self

    def message(as_option=False, **kw):
        with pytest.raises(ValidationError) as info:
            Cfg(**kw)
        return validation_message(info.value, as_option=as_option)

    assert message(grad_clip=-1) == "grad_clip: Input should be greater than 0"
    assert message(True, grad_clip=-1) == "--grad-clip: Input should be greater than 0"
    assert message(prompt={"refine_iters": -1}).startswith("prompt.refine_iters: Input should")
    assert message(True, prompt={"x": 1}) == "--prompt-x: Extra inputs are not permitted"
    assert message(True, grad_clip=7) == "seven is not a clip"  # no field: no prefix


def test_user_errors_print_one_line_and_exit_2():
    import typer

    from medfm.cli._common import user_errors
    from medfm.errors import MedfmError

    @user_errors
    def bad() -> None:
        raise MedfmError("what was wrong; what to do")

    app = typer.Typer()
    app.command()(bad)
    r = CliRunner().invoke(app, [])
    assert r.exit_code == 2 and r.output.strip() == "error: what was wrong; what to do"


def test_an_os_error_from_a_path_is_one_line_and_exit_2(tmp_path):
    import torch

    from medfm.io import write_png

    image = tmp_path / "img.png"
    write_png(torch.from_numpy(np.full((20, 30), 9, np.uint8))[None], image)
    (tmp_path / "afile").write_text("x")
    r = run("seg", "predict", "-m", "box-fill", "-i", image, "--box", "1,1,5,5",
            "-o", tmp_path / "afile" / "m.png")  # fmt: skip
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "afile" in lines[0], lines


def test_a_warning_is_one_line(tmp_path):
    import nibabel as nib

    vol = np.zeros((20, 30, 12), np.float32)
    vol[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "seg", "predict", "--image",
         str(tmp_path / "nan.nii.gz"), "--out", str(tmp_path / "m.nii.gz"),
         "--box", "2,2,10,10,5", "--model", "box-fill"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"warning: {tmp_path / 'nan.nii.gz'}: 1 of 7200 voxels are NaN or infinite; NaN and -inf "
        "were set to the image's lowest finite value (0), +inf to its highest (0)"
    ]
