import pytest
import torch

from medfm.diffusion.sampling import Windows, predict_noise
from medfm.diffusion.schedulers import training_scheduler
from medfm.diffusion.tasks import (
    DENOISE_METHODS,
    anomaly_map,
    denoise,
    estimate_noise_std,
    inpaint,
    matching_timestep,
    synthesize,
)
from medfm.errors import MedfmError


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noise_std_estimate_ignores_smooth_structure():
    z = torch.linspace(0, 1, 40)
    smooth = (z[:, None, None] + z[None, :, None] ** 2 + z[None, None, :]).expand(40, 40, 40)
    for sigma in (0.02, 0.1):
        noisy = smooth + sigma * torch.randn(40, 40, 40, generator=_g())
        assert abs(estimate_noise_std(noisy) / sigma - 1) < 0.05
    with pytest.raises(MedfmError, match="too small"):
        estimate_noise_std(torch.zeros(1, 4, 4))


def test_matching_timestep_has_the_inputs_noise_level(tiny_model):
    ab = training_scheduler(tiny_model.config.schedule).alphas_cumprod
    for sigma in (0.05, 0.2, 1.0):
        t = matching_timestep(sigma, ab)
        level = float(((1 - ab[t]) / ab[t]).sqrt())
        assert abs(level - sigma) / sigma < 0.05
    assert matching_timestep(0.2, ab) > matching_timestep(0.05, ab)


def test_denoise_shapes_determinism_and_errors(tiny_model):
    x = 0.1 * torch.randn(1, 1, 6, 10, 20, generator=_g())  # smaller than the patch on axis 0
    for method in DENOISE_METHODS:
        a = denoise(tiny_model, x, 0.1, method=method, steps=20, generator=_g(1))
        b = denoise(tiny_model, x, 0.1, method=method, steps=20, generator=_g(1))
        assert a.shape == x.shape and torch.equal(a, b)
    with pytest.raises(MedfmError, match="unknown method"):
        denoise(tiny_model, x, 0.1, method="bm3d")
    with pytest.raises(MedfmError, match="positive number"):
        denoise(tiny_model, x, float("nan"))
    with pytest.raises(MedfmError, match="--guidance"):
        denoise(tiny_model, x, 0.1, method="diffpir", guidance=-1)
    with pytest.raises(MedfmError, match="NaN or infinite"):
        denoise(tiny_model, x.clone().fill_(float("inf")), 0.1)
    with pytest.raises(MedfmError, match="2 spatial axes"):
        denoise(tiny_model, x[:, :, 0], 0.1)


def test_posterior_is_tweedies_formula_at_the_matching_step(tiny_model):
    """One model call at t*, no noise added: x - level(t*) * eps(x scaled to t*)."""
    x = 0.3 * torch.randn(1, 1, 8, 10, 20, generator=_g())
    ab = training_scheduler(tiny_model.config.schedule).alphas_cumprod
    t = matching_timestep(0.1, ab)
    a = float(ab[t])
    windows, positions = Windows.for_model(tiny_model, x)
    eps = predict_noise(tiny_model, a**0.5 * x, t, windows, positions=positions)
    expected = x - ((1 - a) / a) ** 0.5 * eps
    got = denoise(tiny_model, x, 0.1, method="posterior")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_diffpir_follows_the_data_as_guidance_falls(tiny_model):
    """guidance -> 0: the data term wins and the input comes back; large guidance: the
    prior's estimate, far from the input."""
    x = 0.3 * torch.randn(1, 1, 8, 10, 20, generator=_g())
    near = denoise(tiny_model, x, 0.1, method="diffpir", steps=4, guidance=1e-9)
    torch.testing.assert_close(near, x, rtol=1e-4, atol=1e-4)
    far = denoise(tiny_model, x, 0.1, method="diffpir", steps=4, guidance=1e6)
    assert (far - x).abs().mean() > 10 * (near - x).abs().mean()


def test_inpaint_works_on_the_box_around_the_hole():
    from medfm.diffusion.tasks import _around

    hole = torch.zeros(40, 30, 64, dtype=torch.bool)
    hole[1:3, 10:12, 30:40] = True
    box = _around(hole, (16, 16, 16))
    # grown by 4 each side, at least 16, inside the volume (pushed off the low edge)
    assert box == (slice(0, 16), slice(3, 19), slice(26, 44))
    assert _around(torch.ones(16, 16, 16, dtype=torch.bool), (16, 16, 16)) == (slice(0, 16),) * 3


def test_a_hole_far_from_the_rest_is_filled_from_its_neighbourhood(tiny_model):
    """A volume of many windows with a small hole: only the hole changes, and the result
    does not depend on what lies beyond the hole's neighbourhood."""
    x = 0.1 * torch.randn(1, 1, 24, 30, 48, generator=_g())
    mask = torch.zeros(1, 1, 24, 30, 48, dtype=torch.bool)
    mask[..., 2:5, 3:7, 5:11] = True
    y = inpaint(tiny_model, x, mask, steps=4, jump_length=2, jump_n_sample=2, generator=_g(2))
    assert torch.equal(y[~mask], x[~mask]) and not torch.equal(y[mask], x[mask])
    far = x.clone()
    far[..., 16:, :, 30:] = 5.0  # beyond the box around the hole
    z = inpaint(tiny_model, far, mask, steps=4, jump_length=2, jump_n_sample=2, generator=_g(2))
    assert torch.equal(z[mask], y[mask])


def test_inpaint_keeps_every_known_voxel(tiny_model):
    x = 0.1 * torch.randn(1, 1, 8, 10, 20, generator=_g())
    mask = torch.zeros(1, 1, 8, 10, 20, dtype=torch.bool)
    mask[..., 2:5, 3:7, 5:11] = True
    y = inpaint(tiny_model, x, mask, steps=6, jump_length=2, jump_n_sample=2, generator=_g(2))
    assert torch.equal(y[~mask], x[~mask])
    assert not torch.allclose(y[mask], x[mask])
    assert torch.equal(inpaint(tiny_model, x, torch.zeros_like(mask)), x)
    with pytest.raises(MedfmError, match="differs from the image"):
        inpaint(tiny_model, x, mask[..., :10])


def test_anomaly_map_and_synthesis_shapes(tiny_model):
    x = 0.1 * torch.randn(2, 1, 8, 10, 20, generator=_g())
    amap = anomaly_map(tiny_model, x, t=300, steps=10, generator=_g(3))
    assert amap.shape == (2, 1, 8, 10, 20) and type(amap) is torch.Tensor
    assert float(amap.min()) >= 0
    with pytest.raises(MedfmError, match="--t must lie in 0..999"):
        anomaly_map(tiny_model, x, t=1000)
    s = synthesize(tiny_model, (6, 10, 20), steps=2, region="chest", generator=_g(4))
    assert s.shape == (1, 1, 6, 10, 20)
    assert torch.equal(
        s, synthesize(tiny_model, (6, 10, 20), steps=2, region="chest", generator=_g(4))
    )


def test_anomaly_scores_of_a_perfect_and_a_useless_map():
    from medfm.diffusion.metrics import anomaly_scores, best_dice

    truth = torch.zeros(6, 8, 10, dtype=torch.bool)
    truth[2:4, 3:5, 4:7] = True
    perfect = truth.float() + 0.01 * torch.rand(6, 8, 10, generator=_g())
    s = anomaly_scores(perfect, truth)
    assert s["auroc"] == pytest.approx(1.0) and s["best_dice"] == pytest.approx(1.0)
    inverted = anomaly_scores(-perfect, truth)
    assert inverted["auroc"] == pytest.approx(0.0)
    dice, threshold = best_dice(torch.arange(10.0), torch.arange(10) >= 6)
    assert dice == pytest.approx(1.0) and threshold == 6.0
    with pytest.raises(MedfmError, match="not none or all"):
        anomaly_scores(perfect, torch.zeros_like(truth))
    with pytest.raises(MedfmError, match="differs"):
        anomaly_scores(perfect, truth[:3])
