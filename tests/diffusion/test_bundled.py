"""The bundled medfm-diff-tiny: in the package, float16 and at most 12 MB, the model of
recipes/medfm_diff_tiny.yaml, loaded without a warning, and a denoiser on a volume it never saw
(a synthetic MRI volume: the model was trained on real MRI only); ``medfm diffusion denoise
--noise-std auto`` works with it and no other file."""

import json
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.diffusion import denoise, estimate_noise_std, load_diffusion_model
from medfm.diffusion.files import BUNDLED_DIR
from medfm.diffusion.intensity import intensity_map
from medfm.recipe import DiffusionTrainStep, load_recipe
from medfm.synth import render_cases, sample_case, to_output
from medfm.synth.case import SynthConfig

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "medfm_diff_tiny.yaml"


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def test_bundled_weights_are_the_recipes_float16_and_small():
    assert sorted(p.name for p in BUNDLED_DIR.iterdir()) == ["config.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in BUNDLED_DIR.iterdir()) <= 12_000_000
    header = _header(BUNDLED_DIR / "model.safetensors")
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes <= {"F16", "I64"} and "F16" in dtypes
    config = json.loads((BUNDLED_DIR / "config.json").read_text())
    trains = [s.diffusion_train for s in load_recipe(RECIPE).steps
              if isinstance(s, DiffusionTrainStep)]  # fmt: skip
    expected = trains[-1].model.model_dump(mode="json")
    assert {k: v for k, v in config.items() if k != "medfm_version"} == {
        k: v for k, v in expected.items() if k != "medfm_version"
    }


def _mri_volume() -> torch.Tensor:
    case = sample_case(SynthConfig(), "mri", (32, 40, 36), 7, 0)
    return to_output([case], render_cases([case]).image)[0].float()[0]


def test_bundled_model_denoises_a_volume_it_never_saw():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_diffusion_model(None)
    clean = _mri_volume()
    imap = intensity_map(clean, "mri")
    x = imap.forward(clean)[None, None]
    sigma = 0.2  # std 0.10 of the [0, 1] range
    noisy = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    assert abs(estimate_noise_std(noisy) / sigma - 1) < 0.15
    out = denoise(model, noisy, sigma)
    mse_noisy = float(((noisy - x) ** 2).mean())
    mse_out = float(((out - x) ** 2).mean())
    assert mse_out < 0.5 * mse_noisy  # > 3 dB better than the input


def test_denoise_command_needs_no_model_file(tmp_path):
    clean = _mri_volume().numpy() * 1000
    rng = np.random.default_rng(0)
    noisy = clean + 50 * rng.standard_normal(clean.shape)
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), np.diag([1.0, 1, 1, 1])),
             str(tmp_path / "scan.nii.gz"))  # fmt: skip
    args = ["--input", tmp_path / "scan.nii.gz", "--noise-std", "auto",
            "--out", tmp_path / "clean.nii.gz"]  # fmt: skip
    r = CliRunner().invoke(app, ["diffusion", "denoise", *map(str, args)])
    assert r.exit_code == 0, r.output
    out = nib.load(str(tmp_path / "clean.nii.gz")).get_fdata()
    assert out.shape == clean.shape
    assert np.mean((out - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2)


def test_shipped_controlnets_are_float16_and_small_with_the_base():
    from medfm.diffusion.files import BUNDLED_CONTROLNETS

    shipped = [f for f in BUNDLED_CONTROLNETS.values() if (f / "config.json").is_file()]
    assert shipped, "the superres ControlNet ships"
    total = sum(p.stat().st_size for f in [BUNDLED_DIR, *shipped] for p in f.iterdir())
    assert total <= 20_000_000  # base and ControlNets together
    base_sha = load_diffusion_model(None).weights_sha256
    for folder in shipped:
        header = _header(folder / "model.safetensors")
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} <= {"F16", "I64"}
        assert json.loads((folder / "config.json").read_text())["base_sha256"] == base_sha


def test_superres_command_needs_no_model_file(tmp_path):
    """``medfm diffusion superres --input low --factor 4 --out high`` with the shipped
    ControlNet on a volume it never saw: the input's slices kept, the spacing divided by 4,
    the gaps close to the truth. (On this synthetic volume, far from the real MRI it was trained
    on, it is worse than linear interpolation: docs/models/medfm-diff-tiny-superres.md.)"""
    clean = _mri_volume().numpy() * 1000  # (32, 40, 36): 9 slices of every 4th -> 33
    low = clean[..., ::4]
    nib.save(nib.Nifti1Image(low.astype(np.float32), np.diag([1.0, 1, 4, 1])),
             str(tmp_path / "low.nii.gz"))  # fmt: skip
    args = ["--input", tmp_path / "low.nii.gz", "--factor", "4", "--out", tmp_path / "hi.nii.gz"]
    r = CliRunner().invoke(app, ["diffusion", "superres", *map(str, args)])
    assert r.exit_code == 0 and "with the ControlNet" in r.output, r.output
    img = nib.load(str(tmp_path / "hi.nii.gz"))
    high = img.get_fdata()
    assert high.shape == (32, 40, 33) and np.allclose(img.header.get_zooms(), (1, 1, 1))
    assert np.allclose(high[..., ::4], low, atol=0.05)
    truth = clean[..., :33]
    gaps = np.arange(33) % 4 != 0
    assert np.corrcoef(high[..., gaps].ravel(), truth[..., gaps].ravel())[0, 1] > 0.8
