"""write_dataset: an nnU-Net v2 folder from (case, image, label) items, read back unchanged."""

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.io import Volume, iter_dataset, read_dataset_json, write_dataset


def _cases(shape, dtype, n=2):
    g = torch.Generator().manual_seed(1)
    affine = np.diag([*(0.5 + i for i in range(len(shape))), *([1.0] * (4 - len(shape)))])
    for i in range(n):
        if dtype == torch.uint8:
            image = torch.randint(0, 256, (1, *shape), generator=g, dtype=dtype)
        else:
            image = torch.randn(1, *shape, generator=g).to(dtype)
        label = torch.randint(0, 3, (1, *shape), generator=g, dtype=torch.uint8)
        yield f"case_{i}", Volume(image, affine), Volume(label, affine)


@pytest.mark.parametrize(
    ("shape", "dtype", "ending"),
    [((10, 20), torch.uint8, ".png"), ((10, 20, 30), torch.float32, ".nii.gz")],
)
def test_round_trip(tmp_path, shape, dtype, ending):
    labels = {"background": 0, "a": 1, "b": 2}
    ds = write_dataset(tmp_path, _cases(shape, dtype), labels=labels, name="t")
    assert ds.file_ending == ending and ds.numTraining == 2 and ds.labels == labels
    assert read_dataset_json(tmp_path) == ds
    got = list(iter_dataset(tmp_path))
    want = list(_cases(shape, dtype))
    assert [c for c, _, _ in got] == [c for c, _, _ in want]
    for (_, im, lab), (_, im0, lab0) in zip(got, want, strict=True):
        assert torch.equal(im.data, im0.data) and torch.equal(lab.data, lab0.data)
        if ending == ".nii.gz":
            assert np.allclose(im.affine, im0.affine)


def test_bad_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(MedfmError, match="background"):
        write_dataset(tmp_path / "x", _cases((10, 20), torch.uint8), labels={"a": 1})
    assert not (tmp_path / "x").exists()
    with pytest.raises(MedfmError, match="no cases"):
        write_dataset(tmp_path / "y", [], labels={"background": 0})
