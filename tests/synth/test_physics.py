"""Each modality's signature: CT dose/noise, MRI Rician background, US Rayleigh speckle."""

import math

import pytest
import torch

from medfm.synth import ct, mri, us
from medfm.synth.case import SynthConfig, render_cases, sample_case, to_output

RAYLEIGH_RATIO = math.sqrt(math.pi / (4 - math.pi))  # mean / std = 1.913


def _g(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_ct_noise_std_halves_when_dose_quadruples():
    case = sample_case(SynthConfig(), "ct", (96, 80), 0, 0)
    p = case.physics.model_copy(update={"streaks": (), "beam": (), "dose": 1.0})
    flat = torch.full((1, 1, 96, 80), 40.0)  # homogeneous soft tissue, HU
    grid = torch.zeros(2, 96, 80)
    noise = {"quantum": torch.randn(1, 1, 96, 80, generator=_g(0))}
    std = {}
    for dose in (1.0, 4.0):
        img = ct.render_hu([p.model_copy(update={"dose": dose})], flat, grid, noise)
        std[dose] = float(img[..., 10:-10, 10:-10].std())
        assert float(img.mean()) == pytest.approx(40.0, abs=3)
    assert std[1.0] / std[4.0] == pytest.approx(2.0, rel=1e-4)
    # the noise std is the configured HU level at dose 1 (up to sampling error)
    assert std[1.0] == pytest.approx(p.noise_hu, rel=0.15)


def test_ct_3d_stays_in_hu_and_2d_is_windowed():
    cfg = SynthConfig()
    c3 = [sample_case(cfg, "ct", (40, 40, 32), 1, 0)]
    out3 = to_output(c3, render_cases(c3).image)
    assert out3.dtype == torch.int16 and int(out3.min()) <= -900
    c2 = [sample_case(cfg, "ct", (64, 64), 1, 0)]
    out2 = to_output(c2, render_cases(c2).image)
    assert out2.dtype == torch.uint8


def test_mri_background_is_rician():
    p = mri.MRIParams(weighting="t1", bias=(0.0,) * 10, bias_order=3, phase_axis=0, noise=0.03)
    shape = (1, 1, 256, 256)
    signal = torch.zeros(shape)
    signal[..., 96:160, 96:160] = 0.6  # an object in the middle, air elsewhere
    noise = {
        "real": torch.randn(shape, generator=_g(1)),
        "imag": torch.randn(shape, generator=_g(2)),
        "lines": torch.rand(1, 256, generator=_g(3)),
    }
    mag = mri.render([p], signal, noise)
    bg = torch.cat([mag[..., :64, :].flatten(), mag[..., -64:, :].flatten()])
    assert float(bg.mean()) == pytest.approx(0.03 * math.sqrt(math.pi / 2), rel=0.03)
    assert float(bg.mean() / bg.std()) == pytest.approx(RAYLEIGH_RATIO, abs=0.05)
    # inside the object the magnitude is ~ Gaussian around the signal (high SNR)
    obj = mag[..., 104:152, 104:152]
    assert float(obj.mean()) == pytest.approx(0.6, rel=0.02)


def test_mri_kspace_artifacts_change_the_image_and_identity_params_do_not():
    shape = (1, 1, 64, 64)
    signal = torch.zeros(shape)
    signal[..., 20:44, 24:37] = (
        0.8  # widths that are not a divisor of 64 (no sinc zeros on the comb)
    )
    zeros = {
        "real": torch.zeros(shape),
        "imag": torch.zeros(shape),
        "lines": torch.rand(1, 64, generator=_g(0)),
    }
    base = mri.MRIParams(weighting="t1", bias=(0.0,) * 10, bias_order=3, phase_axis=1, noise=0.0)
    clean = mri.render([base], signal, zeros)
    assert torch.allclose(clean, signal, atol=1e-5)
    for update in (
        {"gibbs_keep": 0.5},
        {"ghosts": 4, "ghost_intensity": 0.8},
        {"motion_fraction": 0.3, "motion_start": 0.2, "motion_shift": (0.0, 3.0)},
        {"partial_fourier": 0.6},
        {"acceleration": 3.0},
    ):
        out = mri.render([base.model_copy(update=update)], signal, zeros)
        assert float((out - signal).abs().max()) > 0.05, update
    ghost = mri.render(
        [base.model_copy(update={"ghosts": 4, "ghost_intensity": 0.8})], signal, zeros
    )
    # ghosts appear outside the object along the phase-encode axis (axis 1 here)
    assert float(ghost[..., 20:44, :16].mean()) > 0.01


def test_us_speckle_envelope_is_rayleigh():
    case = sample_case(SynthConfig(), "us", (256, 256), 0, 0)
    shape = (1, 1, 512, 512)
    noise = {
        "real": torch.randn(shape, generator=_g(4)),
        "imag": torch.randn(shape, generator=_g(5)),
    }
    env = us.envelope([case.physics], noise)[..., 16:-16, 16:-16]
    assert float(env.mean() / env.std()) == pytest.approx(RAYLEIGH_RATIO, abs=0.05)
    assert float((env**2).mean()) == pytest.approx(1.0, rel=0.05)


def test_us_homogeneous_region_is_rayleigh_through_the_render_path():
    """Homogeneous tissue, no attenuation or specular echoes: the echo amplitude that the
    renderer log-compresses is Rayleigh (mean / std = 1.91) in the probe's polar frame."""
    case = sample_case(SynthConfig(), "us", (256, 256), 2, 0)
    p = case.physics.model_copy(update={"attenuation": 0.0, "specular": 0.0})
    echo = torch.full((1, 1, 256, 256), 0.5)
    acoustic = torch.tensor([1.6, 1.0]).view(1, 2, 1, 1).expand(1, 2, 256, 256).clone()
    noise = {
        "real": torch.randn(1, 1, 256, 256, generator=_g(6)),
        "imag": torch.randn(1, 1, 256, 256, generator=_g(7)),
    }
    amp = us.polar_amplitude([p], echo, acoustic, noise)[..., 8:-8, 8:-8]
    assert float(amp.mean() / amp.std()) == pytest.approx(RAYLEIGH_RATIO, abs=0.05)
    assert float((amp**2).mean()) == pytest.approx(0.5, rel=0.05)  # E|A|^2 = echogenicity
    img, mask = us.render([p], echo, acoustic, noise)
    assert not bool(img[~mask].any())  # the outside of the beam is black
    assert 0.2 < float(img[mask].mean()) < 0.9


def test_us_outside_of_fan_is_black_and_unlabelled():
    cfg = SynthConfig()
    cases = [sample_case(cfg, "us", (128, 128), 5, i) for i in range(6)]
    r = render_cases(cases)
    out = to_output(cases, r.image)
    from medfm.kernels import sector_grid

    for i, c in enumerate(cases):
        p = c.physics
        _, inside = sector_grid(
            (128, 128), torch.tensor([p.apex]), torch.tensor([p.radii]), torch.tensor([p.angles])
        )
        assert not bool(out[i][~inside[0]].any())
        assert not bool(r.label[i][~inside[0]].any())
        assert 0.3 < float(inside.float().mean()) < 1.0
    assert {c.physics.probe for c in cases} >= {"sector", "linear"} or len(cases) < 6


@pytest.mark.parametrize("module, cfg", [(ct, ct.CTConfig()), (mri, mri.MRIConfig()),
                                         (us, us.USConfig())])  # fmt: skip
def test_sample_params_takes_a_generator_and_is_deterministic(module, cfg):
    anatomy = sample_case(SynthConfig(), "ct", (64, 64), 0, 0).anatomy
    a = module.sample_params(cfg, _g(3), anatomy=anatomy, shape=(64, 64))
    b = module.sample_params(cfg, _g(3), anatomy=anatomy, shape=(64, 64))
    c = module.sample_params(cfg, _g(4), anatomy=anatomy, shape=(64, 64))
    assert a == b and a != c
    assert type(a).model_validate_json(a.model_dump_json()) == a
