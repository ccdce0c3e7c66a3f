import numpy as np
import pytest
import torch
import torch.nn.functional as F

import medfm.kernels
from medfm.errors import MedfmError
from medfm.io import Volume, resample_volume


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def test_properties_with_oblique_affine():
    affine = np.eye(4)
    affine[:3, :3] = _rotation(30) @ np.diag([1.5, 0.5, 2.0])
    affine[:3, 3] = [10, -20, 5]
    vol = Volume(torch.zeros(2, 10, 20, 30), affine)
    assert vol.ndim == 3
    assert vol.shape == (10, 20, 30)
    np.testing.assert_allclose(vol.spacing, (1.5, 0.5, 2.0))
    assert vol.affine.dtype == np.float64
    assert repr(vol) == "Volume(data=(2, 10, 20, 30) float32 on cpu, spacing=(1.5, 0.5, 2) mm)"


def test_from_array_numpy_2d_and_3d():
    arr = np.arange(10 * 20, dtype=np.int16).reshape(10, 20)
    vol = Volume.from_array(arr, spacing=(0.5, 0.25))
    assert vol.data.shape == (1, 10, 20) and vol.data.dtype == torch.int16
    np.testing.assert_array_equal(vol.data[0].numpy(), arr)
    np.testing.assert_allclose(vol.affine, np.diag([0.5, 0.25, 1.0, 1.0]))
    assert vol.spacing == (0.5, 0.25)

    arr3 = np.zeros((3, 10, 20, 30), dtype=np.uint16)
    vol3 = Volume.from_array(arr3, has_channel=True)
    assert vol3.data.shape == (3, 10, 20, 30) and vol3.data.dtype == torch.int32
    assert vol3.spacing == (1.0, 1.0, 1.0)


def test_from_array_tensor_shares_memory_and_takes_affine():
    t = torch.zeros(10, 20, 30)
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    vol = Volume.from_array(t, affine=affine)
    vol.data[0, 1, 2, 3] = 7
    assert t[1, 2, 3] == 7
    assert vol.spacing == (2.0, 3.0, 4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=np.zeros((1, 4, 5)), affine=np.eye(4)), "torch.Tensor"),
        (dict(data=torch.zeros(4, 5), affine=np.eye(4)), "2 or 3 spatial"),
        (dict(data=torch.zeros(1, 2, 3, 4, 5), affine=np.eye(4)), "2 or 3 spatial"),
        (dict(data=torch.zeros(1, 4, 5, dtype=torch.complex64), affine=np.eye(4)), "complex"),
        (dict(data=torch.zeros(1, 0, 5), affine=np.eye(4)), "empty"),
        (dict(data=torch.zeros(1, 4, 5), affine=np.eye(3)), r"\(4, 4\)"),
        (dict(data=torch.zeros(1, 4, 5), affine=np.diag([1, 0, 1, 1.0])), "singular"),
        (dict(data=torch.zeros(1, 4, 5), affine=np.full((4, 4), np.nan)), "NaN"),
        (dict(data=torch.zeros(1, 4, 5), affine=np.ones((4, 4))), "last row"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(MedfmError, match=match):
        Volume(**kwargs)


def test_from_array_validation():
    with pytest.raises(MedfmError, match="not both"):
        Volume.from_array(np.zeros((4, 5)), spacing=(1, 1), affine=np.eye(4))
    with pytest.raises(MedfmError, match="spacing"):
        Volume.from_array(np.zeros((4, 5, 6)), spacing=(1, 1))
    with pytest.raises(MedfmError, match="positive"):
        Volume.from_array(np.zeros((4, 5)), spacing=(1, -1))
    with pytest.raises(MedfmError, match="has_channel"):
        Volume.from_array(np.zeros((4, 5, 6, 7)))  # 4 spatial axes without has_channel


def _reference_resample(x, spacing_in, spacing_out, mode="linear"):
    """The kernel's documented contract, for testing the affine bookkeeping on its own."""
    triples = zip(x.shape[2:], spacing_in, spacing_out, strict=True)
    size = [max(1, round(s * i / o)) for s, i, o in triples]
    interp = {"linear": "trilinear" if x.ndim == 5 else "bilinear"}.get(mode, mode)
    kw = {} if interp == "nearest" else {"align_corners": True}
    return F.interpolate(x.float(), size=size, mode=interp, **kw)


def _check_world_ramp(resample):
    # data = world x + 2 world y - world z: linear in the voxel index, so linear resampling with
    # a correct affine must give, at every new voxel, the same function of its world position.
    affine = np.eye(4)
    affine[:3, :3] = _rotation(20) @ np.diag([1.5, 1.0, 2.0])
    affine[:3, 3] = [3.0, -4.0, 7.0]
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in (10, 12, 14)], indexing="ij"), -1)

    def field(aff, ijk):
        world = ijk @ aff[:3, :3].T + aff[:3, 3]
        return world @ np.array([1.0, 2.0, -1.0])

    vol = Volume(torch.from_numpy(field(affine, idx)).float()[None], affine)
    out = resample(vol, (1.0, 1.0, 1.0))
    assert out.shape == (15, 12, 28)
    np.testing.assert_allclose(out.affine[:3, 3], affine[:3, 3])  # voxel 0 stays put
    np.testing.assert_allclose(out.spacing, (1.5 * 9 / 14, 1.0, 2.0 * 13 / 27))
    new_idx = np.stack(np.meshgrid(*[np.arange(s) for s in out.shape], indexing="ij"), -1)
    np.testing.assert_allclose(out.data[0].numpy(), field(out.affine, new_idx), atol=1e-3)
    # world position of the last voxel is kept too (align_corners=True)
    last_old = affine @ [9, 11, 13, 1]
    last_new = out.affine @ [14, 11, 27, 1]
    np.testing.assert_allclose(last_new, last_old)


def test_resample_volume_affine_with_reference_kernel(monkeypatch):
    monkeypatch.setattr(medfm.kernels, "resample_to_spacing", _reference_resample, raising=False)
    _check_world_ramp(resample_volume)


def test_resample_volume_singleton_axis(monkeypatch):
    monkeypatch.setattr(medfm.kernels, "resample_to_spacing", _reference_resample, raising=False)
    vol = Volume.from_array(torch.ones(10, 20, 1), spacing=(1.0, 1.0, 3.0))
    out = resample_volume(vol, (2.0, 2.0, 1.5))
    assert out.shape == (5, 10, 2)
    np.testing.assert_allclose(out.spacing, (9 / 4, 19 / 9, 1.5))
    with pytest.raises(MedfmError, match="one value per spatial axis"):
        resample_volume(vol, (1.0, 1.0))


def test_resample_volume_with_real_kernel():
    try:
        from medfm.kernels import resample_to_spacing  # noqa: F401
    except ImportError:
        pytest.skip("medfm.kernels.resample_to_spacing is not available yet")
    _check_world_ramp(resample_volume)


def test_resample_volume_dtypes_with_real_kernel():
    try:
        from medfm.kernels import resample_to_spacing  # noqa: F401
    except ImportError:
        pytest.skip("medfm.kernels.resample_to_spacing is not available yet")
    lab = torch.zeros(1, 10, 20, 30, dtype=torch.uint8)
    lab[0, 3:7, 5:15, 10:20] = 2
    vol = Volume(lab, np.diag([1.0, 0.5, 2.0, 1.0]))
    out = resample_volume(vol, (0.5, 1.0, 1.0), mode="nearest")
    assert out.data.dtype == torch.uint8 and set(out.data.unique().tolist()) == {0, 2}
    assert out.shape == (20, 10, 60)
    ct = Volume(torch.full((1, 10, 20, 30), -1000, dtype=torch.int16), np.eye(4))
    out = resample_volume(ct, (2.0, 2.0, 2.0))
    assert out.data.dtype == torch.float32 and torch.all(out.data == -1000)
