import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.kernels import cartesian_to_polar, polar_to_cartesian, sector_grid

OUT = (40, 50)
APEX = torch.tensor([[-5.0, 24.5], [2.0, 20.0]])
R_RANGE = torch.tensor([[8.0, 42.0], [3.5, 30.0]])
ANGLES = torch.tensor([[-0.6, 0.65], [-0.9, 0.3]])


def geometry(b: int):
    """float64 radius and angle of every output pixel of sample b."""
    rows, cols = np.meshgrid(np.arange(OUT[0]), np.arange(OUT[1]), indexing="ij")
    dy = rows - APEX[b, 0].item()
    dx = cols - APEX[b, 1].item()
    return np.hypot(dy, dx), np.arctan2(dx, dy)


def test_mask_matches_geometry():
    grid, inside = sector_grid(OUT, APEX, R_RANGE, ANGLES)
    assert grid.shape == (2, *OUT, 2) and grid.dtype == torch.float32
    assert inside.shape == (2, 1, *OUT) and inside.dtype == torch.bool
    for b in range(2):
        r, th = geometry(b)
        (r0, r1), (t0, t1) = R_RANGE[b].tolist(), ANGLES[b].tolist()
        ref = (r >= r0) & (r <= r1) & (th >= t0) & (th <= t1)
        sure = np.minimum.reduce([abs(r - r0), abs(r - r1), abs(th - t0), abs(th - t1)]) > 1e-4
        np.testing.assert_array_equal(inside[b, 0].numpy()[sure], ref[sure])
        assert 100 < ref.sum() < ref.size
        # Inside the fan the grid stays in [-1, 1].
        assert grid[b][inside[b, 0]].abs().max() <= 1 + 1e-5


def test_polar_to_cartesian_reproduces_radius_and_angle():
    n_r, n_t = 16, 12
    radius = torch.stack([torch.linspace(*R_RANGE[b].tolist(), n_r) for b in range(2)])
    angle = torch.stack([torch.linspace(*ANGLES[b].tolist(), n_t) for b in range(2)])
    polar = torch.stack(
        [radius[:, :, None].expand(2, n_r, n_t), angle[:, None, :].expand(2, n_r, n_t)], dim=1
    )  # channel 0 = r, channel 1 = theta: both linear in the polar indices
    img, mask = polar_to_cartesian(polar, APEX, R_RANGE, ANGLES, OUT)
    assert img.shape == (2, 2, *OUT) and mask.shape == (2, 1, *OUT)
    for b in range(2):
        r, th = geometry(b)
        m = mask[b, 0].numpy()
        np.testing.assert_allclose(img[b, 0].numpy()[m], r[m], atol=1e-3)
        np.testing.assert_allclose(img[b, 1].numpy()[m], th[m], atol=1e-4)
    assert torch.equal(img[~mask.expand_as(img)], torch.zeros(int((~mask).sum()) * 2))


def test_cartesian_to_polar_samples_the_fan():
    n_r, n_t = 16, 12
    rows = torch.arange(OUT[0], dtype=torch.float32)[:, None].expand(OUT)
    cols = torch.arange(OUT[1], dtype=torch.float32)[None, :].expand(OUT)
    image = torch.stack([rows, cols])[None].expand(2, 2, *OUT)
    polar = cartesian_to_polar(image, APEX, R_RANGE, ANGLES, (n_r, n_t))
    assert polar.shape == (2, 2, n_r, n_t)
    for b in range(2):
        r = np.linspace(*R_RANGE[b].tolist(), n_r)[:, None]
        th = np.linspace(*ANGLES[b].tolist(), n_t)[None, :]
        y = APEX[b, 0].item() + r * np.cos(th)
        x = APEX[b, 1].item() + r * np.sin(th)
        ok = (y >= 0) & (y <= OUT[0] - 1) & (x >= 0) & (x <= OUT[1] - 1)
        np.testing.assert_allclose(polar[b, 0].numpy()[ok], y[ok], atol=1e-3)
        np.testing.assert_allclose(polar[b, 1].numpy()[ok], x[ok], atol=1e-3)


def test_cartesian_to_polar_padding():
    image = torch.full((2, 1, *OUT), 3.0)
    zeros = cartesian_to_polar(image, APEX, R_RANGE, ANGLES, (16, 12))
    border = cartesian_to_polar(image, APEX, R_RANGE, ANGLES, (16, 12), padding_mode="border")
    assert (zeros == 0).any()  # the fan reaches below the image (apex row -5, r_max 42)
    torch.testing.assert_close(border, torch.full_like(border, 3.0))
    with pytest.raises(MedfmError):
        cartesian_to_polar(image, APEX, R_RANGE, ANGLES, (16, 12), padding_mode="wrap")


def test_round_trip_inside_the_fan():
    rows = torch.arange(OUT[0], dtype=torch.float32)[:, None]
    cols = torch.arange(OUT[1], dtype=torch.float32)[None, :]
    image = (torch.sin(rows / 7) + torch.cos(cols / 9))[None, None].expand(2, 1, *OUT)
    polar = cartesian_to_polar(image, APEX, R_RANGE, ANGLES, (96, 96))
    back, mask = polar_to_cartesian(polar, APEX, R_RANGE, ANGLES, OUT)
    for b in range(2):
        r, th = geometry(b)
        (r0, r1), (t0, t1) = R_RANGE[b].tolist(), ANGLES[b].tolist()
        interior = (r >= r0 + 2) & (r <= r1 - 2) & (th >= t0 + 0.05) & (th <= t1 - 0.05)
        interior[:2] = interior[-2:] = interior[:, :2] = interior[:, -2:] = False  # image edge
        assert interior.sum() > 100 and mask[b, 0].numpy()[interior].all()
        err = np.abs(back[b, 0].numpy() - image[b, 0].numpy())[interior]
        assert err.max() < 0.02
    assert torch.equal(back[~mask], torch.zeros(int((~mask).sum())))


def test_depth_axis_equals_per_slice(gen):
    polar = torch.rand(2, 1, 16, 12, 5, generator=gen)
    img, mask = polar_to_cartesian(polar, APEX, R_RANGE, ANGLES, OUT)
    assert img.shape == (2, 1, *OUT, 5) and mask.shape == (2, 1, *OUT, 5)
    back = cartesian_to_polar(img, APEX, R_RANGE, ANGLES, (16, 12))
    assert back.shape == polar.shape
    for d in range(5):
        img2, mask2 = polar_to_cartesian(polar[..., d], APEX, R_RANGE, ANGLES, OUT)
        assert torch.equal(img[..., d], img2) and torch.equal(mask[..., d], mask2)
        back2 = cartesian_to_polar(img2, APEX, R_RANGE, ANGLES, (16, 12))
        assert torch.equal(back[..., d], back2)


def test_per_sample_parameters_equal_separate_calls(gen):
    polar = torch.rand(2, 3, 16, 12, generator=gen)
    img, mask = polar_to_cartesian(polar, APEX, R_RANGE, ANGLES, OUT)
    for b in range(2):
        params = (APEX[b].tolist(), R_RANGE[b].tolist(), ANGLES[b].tolist())
        one, one_mask = polar_to_cartesian(polar[b : b + 1], *params, OUT)
        torch.testing.assert_close(img[b : b + 1], one)
        assert torch.equal(mask[b : b + 1], one_mask)


def test_scan_rejects_bad_input(gen):
    with pytest.raises(MedfmError):
        polar_to_cartesian(torch.rand(2, 1, 16, 12, generator=gen), APEX[:1], R_RANGE, ANGLES, OUT)
    with pytest.raises(MedfmError):
        cartesian_to_polar(torch.rand(2, 40, 50, generator=gen), APEX, R_RANGE, ANGLES, (8, 8))


@pytest.mark.gpu
def test_scan_cuda_matches_cpu(gen, cuda):
    polar = torch.rand(2, 1, 16, 12, 3, generator=gen)
    args = (APEX.to(cuda), R_RANGE.to(cuda), ANGLES.to(cuda))
    img, mask = polar_to_cartesian(polar.to(cuda), *args, OUT)
    assert img.device.type == "cuda"
    ref, ref_mask = polar_to_cartesian(polar, APEX, R_RANGE, ANGLES, OUT)
    both = mask.cpu() & ref_mask  # pixels exactly on the fan's edge may round either way
    torch.testing.assert_close(img.cpu()[both], ref[both], atol=1e-4, rtol=1e-4)
    assert (mask.cpu() != ref_mask).float().mean() < 0.01
    back = cartesian_to_polar(img, *args, (16, 12)).cpu()
    torch.testing.assert_close(
        back, cartesian_to_polar(ref, APEX, R_RANGE, ANGLES, (16, 12)), atol=1e-4, rtol=1e-4
    )
