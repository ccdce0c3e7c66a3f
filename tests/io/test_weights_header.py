"""Weights files checked from their header before anything is loaded (`safetensors_shapes`,
`check_shapes`), and loaded only when they fit in memory (`read_state_dict`)."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from medfm.errors import MedfmError
from medfm.io.memory import MEMORY_LIMIT_ENV
from medfm.io.weights import check_shapes, read_state_dict, safetensors_bytes, safetensors_shapes

STATE = {"a.weight": torch.ones(3, 4), "b.bias": torch.zeros(5, dtype=torch.float16)}


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(STATE, str(path))
    return path


def test_shapes_and_bytes_from_the_header(weights):
    assert safetensors_shapes(weights) == {"a.weight": (3, 4), "b.bias": (5,)}
    assert safetensors_bytes(weights) == 3 * 4 * 4 + 5 * 2
    check_shapes({"a.weight": (3, 4), "b.bias": [5]}, weights)


def test_check_shapes_names_the_first_mismatch(weights):
    with pytest.raises(MedfmError) as e:
        check_shapes({"a.weight": (3, 16384), "b.bias": (6,)}, weights, what="the config")
    assert str(e.value) == (
        f"{weights} does not fit the config: a.weight is (3, 4) in the file, (3, 16384) "
        "expected (and 1 more of other shapes); the weights are not those of this model"
    )
    with pytest.raises(MedfmError, match=r"c.weight \(2,\) is not in the file \(and 1 unexpect"):
        check_shapes({"a.weight": (3, 4), "c.weight": (2,)}, weights)
    with pytest.raises(MedfmError, match="the file's b.bias is not expected; fix it"):
        check_shapes({"a.weight": (3, 4)}, weights, hint="fix it")


def _raw(path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize(
    "header, data, why",
    [
        (b"{not json", b"", "its header is not JSON"),
        (b"[1, 2]", b"", "not a JSON object"),
        (b"[" * 100000 + b"]" * 100000, b"", "nested too deeply|not JSON"),
        (json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}), b"", "at"),
        (json.dumps({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 0]}}), b"", "at"),
        (json.dumps({"t": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 8]}}), b"\0" * 8,
         "does not match its data"),
        (json.dumps({"t": {"dtype": "X99", "shape": [2], "data_offsets": [0, 8]}}), b"\0" * 8,
         "unknown dtype"),
        (json.dumps({"t": 3}), b"", "has no description"),
    ],
)  # fmt: skip
def test_damaged_headers_are_one_line(tmp_path, header, data, why):
    path = tmp_path / "w.safetensors"
    _raw(path, header if isinstance(header, bytes) else header.encode(), data)
    with pytest.raises(
        MedfmError, match=f"cannot read .*w.safetensors as a safetensors file.*({why})"
    ):
        safetensors_shapes(path)
    with pytest.raises(MedfmError):
        read_state_dict(path)


def test_a_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(MedfmError, match=r"a 4611686018427387904-byte header in a 10-byte file"):
        safetensors_shapes(path)


def test_weights_that_do_not_fit_are_not_loaded(weights, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "57")
    with pytest.raises(MedfmError, match=r"loading the weights .* needs ~58 B, 57 B memory"):
        read_state_dict(weights)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "58")
    assert read_state_dict(weights).keys() == STATE.keys()


def test_pth_files_are_memory_mapped_and_legacy_ones_checked(tmp_path, monkeypatch):
    zipped, legacy = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save(STATE, zipped)
    torch.save(STATE, legacy, _use_new_zipfile_serialization=False)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1")  # a mapped file costs no memory to look at
    assert torch.equal(read_state_dict(zipped)["a.weight"], STATE["a.weight"])
    with pytest.raises(MedfmError, match=r"loading the checkpoint .*b.pth needs ~"):
        read_state_dict(legacy)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "1G")
    assert torch.equal(read_state_dict(legacy)["b.bias"], STATE["b.bias"])
