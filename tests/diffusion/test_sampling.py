import pytest
import torch

from medfm.diffusion.model import DiffusionModel
from medfm.diffusion.sampling import Windows, initial_noise, pad_to, reverse_process
from medfm.diffusion.schedulers import SAMPLERS, make_scheduler, repaint_scheduler
from medfm.errors import MedfmError
from tests.diffusion.conftest import tiny_config


class WindowConstant(DiffusionModel):
    """A stand-in whose noise estimate is a constant per window (the sum of the window
    centre's coordinates) plus a little of its input: blending windows badly leaves a step
    in the output exactly where a window ends."""

    def forward(self, x, timesteps, *, positions=None, **kwargs):
        f = self.config.unet.pos_frequencies
        centre = positions[:, :: 2 * f + 1].mean(dim=(2, 3, 4)).sum(1)
        return 0.1 * x + centre.view(-1, 1, 1, 1, 1)


def border_ratio(y: torch.Tensor, windows: Windows, axis: int) -> float:
    """Mean |slice step| at window borders over the mean elsewhere, along ``axis``."""
    n, p = windows.shape[axis], windows.patch[axis]
    borders = set()
    for s in {st[axis] for st in windows.starts}:
        if s > 0:
            borders.add(s - 1)  # the step between slices s - 1 and s
        if s + p < n:
            borders.add(s + p - 1)
    dims = [d for d in range(y.ndim) if d != axis + 2]
    steps = y.diff(dim=axis + 2).abs().mean(dim=dims)
    inside = [k for k in range(n - 1) if k not in borders]
    return float(steps[sorted(borders)].mean() / steps[inside].mean())


def test_blended_windows_leave_no_seam():
    model = WindowConstant(tiny_config(patch=(8, 8, 8)))
    shape = (1, 1, 20, 24, 28)
    for overlap, seams in ((0.0, True), (0.5, False)):
        sched = make_scheduler("ddim", 4, model.config.schedule)
        y = reverse_process(model, torch.zeros(shape), sched, overlap=overlap)
        windows = Windows.plan(shape[2:], (8, 8, 8), overlap)
        ratios = [border_ratio(y, windows, axis) for axis in range(3)]
        if seams:  # the measure sees the seams of unblended windows
            assert min(ratios) > 2, ratios
        else:
            assert max(ratios) <= 1.0, ratios


def test_windows_cover_the_volume_and_end_flush():
    w = Windows.plan((20, 8, 13), (8, 8, 8), overlap=0.5)
    assert sorted({s[0] for s in w.starts}) == [0, 4, 8, 12]
    assert sorted({s[1] for s in w.starts}) == [0]
    assert sorted({s[2] for s in w.starts}) == [0, 4, 5]
    assert w.weight.shape == (8, 8, 8) and float(w.weight.min()) >= 1e-3
    with pytest.raises(ValueError, match="smaller than the patch"):
        Windows.plan((6, 8, 8), (8, 8, 8))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_generator_same_volume(tiny_model, name):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        x = initial_noise((1, 1, 8, 10, 18), generator=g)
        sched = make_scheduler(name, 3, tiny_model.config.schedule)
        calls = []
        y = reverse_process(
            tiny_model, x, sched, generator=g, progress=lambda d, t: calls.append((d, t))
        )
        assert calls == [(1, 3), (2, 3), (3, 3)]
        return y

    a, b = run(0), run(0)
    assert a.shape == (1, 1, 8, 10, 18) and torch.isfinite(a).all()
    # the clean estimates are clipped to the training range: at t = T - 1 an unclipped one
    # multiplies the model's error by 1 / sqrt(alpha_bar) ~ 2e4
    assert float(a.abs().max()) <= 1 + 1e-5
    assert torch.equal(a, b)
    assert not torch.equal(a, run(1))


def test_pad_to_repeats_edges_and_cuts_back():
    x = torch.arange(6.0).view(1, 1, 1, 2, 3)
    padded, keep = pad_to(x, (2, 2, 4))
    assert padded.shape == (1, 1, 2, 2, 4)
    assert torch.equal(padded[keep], x)
    assert torch.equal(padded[0, 0, 1], x[0, 0, 0].new_tensor([[0, 1, 2, 2], [3, 4, 5, 5]]))


def test_scheduler_arguments_are_checked(tiny_model):
    with pytest.raises(MedfmError, match="unknown sampler 'euler'"):
        make_scheduler("euler", 10, tiny_model.config.schedule)
    with pytest.raises(MedfmError, match="--steps must lie in 1..1000"):
        make_scheduler("ddim", 0, tiny_model.config.schedule)
    with pytest.raises(MedfmError, match="--jump-length must be >= 1, got 0"):
        repaint_scheduler(10, 0, 2, tiny_model.config.schedule)
    jumps = [int(t) for t in repaint_scheduler(10, 2, 2, tiny_model.config.schedule).timesteps]
    assert jumps[0] == 900 and jumps[-1] == 0  # 10 steps of 100, then back up at each jump
    assert any(b > a for a, b in zip(jumps, jumps[1:], strict=False))
