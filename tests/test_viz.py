"""medfm.viz: outlines, mid-slices, montages, overlays. The pinned hashes are what the drawing
code gave before it moved out of synth and seg: previews and overlays stay pixel-identical."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from medfm.errors import MedfmError
from medfm.io import DatasetJson, Volume, write_case, write_dataset_json
from medfm.synth.preview import write_preview
from medfm.viz import PALETTE, mid_slices, montage, outline_tile, overlay_row, to_grey


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_outline_tile_draws_each_label_in_its_colour_and_is_pinned():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(10, 20, generator=g) * 100
    lab = torch.zeros(10, 20, dtype=torch.long)
    lab[2:7, 3:12] = 1
    lab[4:6, 5:8] = 2
    lab[1:9, 15:19] = 11
    tile = outline_tile(img, lab, size=24)
    assert tile.shape == (24, 24, 3) and tile.dtype == np.uint8
    assert not tile[12:].any()  # (10, 20) scaled to (12, 24), black below
    colours = {tuple(c) for c in tile.reshape(-1, 3)}
    assert {tuple(PALETTE[0]), tuple(PALETTE[1]), tuple(PALETTE[10 % len(PALETTE)])} <= colours
    assert sha(tile) == "5f6a508144bdc4544a90119c85c40d009a9c7ab0e1abf79db0603aa227d7a68d"
    vol = torch.randn(10, 20, 30, generator=g)
    vlab = (vol > 1).long() + (vol > 2).long()
    slices = mid_slices(vol, vlab)
    assert [tuple(a.shape) for a, _ in slices] == [(10, 20), (10, 30), (20, 30)]
    assert torch.equal(slices[0][0], vol[:, :, 15]) and torch.equal(slices[2][1], vlab[5])
    strip = np.concatenate([outline_tile(a, b, 16) for a, b in slices], 1)
    assert sha(strip) == "f22501387838a48b0b94bc87b5c540f94ba48843fefbfe2bead72aa0618daf88"


def test_to_grey_maps_uint8_exactly_and_floats_by_percentiles():
    u = torch.tensor([[0, 255], [51, 102]], dtype=torch.uint8)
    assert torch.equal(to_grey(u), u.float() / 255)
    x = torch.linspace(-1000, 1000, 1001).reshape(7, 143)
    g = to_grey(x)
    assert g.min() == 0 and g.max() == 1 and (g == 0).sum() > 1 and (g == 1).sum() > 1


def test_montage_pads_short_rows_with_black():
    a = np.full((4, 4, 3), 7, np.uint8)
    b = np.full((4, 4, 3), 9, np.uint8)
    grid = montage([[a, b], [b]], tile=4)
    assert grid.shape == (8, 8, 3)
    assert (grid[:4, :4] == 7).all() and (grid[:4, 4:] == 9).all()
    assert (grid[4:, :4] == 9).all() and not grid[4:, 4:].any()
    with pytest.raises(MedfmError, match="at least one tile"):
        montage([[]])


def test_overlay_row_is_pinned():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    gt, pred = rng.integers(0, 3, (30, 20)), rng.integers(0, 3, (30, 20))
    row = overlay_row(rgb, gt, pred)
    assert row.shape == (3, 256, 768) and row.dtype == np.uint8
    # the first tile has no outlines: grey only (r = g = b)
    assert (row[0, :, :256] == row[1, :, :256]).all()
    assert sha(row) == "412f3b02ccdfd07833962815e1b61915090e02c90ba6efc1937042ccb6923dd6"


def test_synth_preview_pixels_are_pinned(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.randn(10, 20, generator=g), torch.randn(10, 20, 30, generator=g)  # the stream above
    ds = DatasetJson(channel_names={"0": "x"}, labels={"background": 0, "a": 1, "b": 2},
                     numTraining=3, file_ending=".png")  # fmt: skip
    write_dataset_json(tmp_path, ds)
    for i in range(3):
        im = torch.randint(0, 256, (1, 10 + i, 20), generator=g, dtype=torch.uint8)
        lb = torch.zeros(1, 10 + i, 20, dtype=torch.uint8)
        lb[0, 2:6, 4 + i : 12] = 1
        lb[0, 6:9, 2:5] = 2
        write_case(tmp_path, f"c{i}", Volume.from_array(im, has_channel=True),
                   Volume.from_array(lb, has_channel=True), ".png")  # fmt: skip
    path = write_preview(tmp_path, tmp_path / "p.png", per_row=2)
    pixels = np.asarray(Image.open(path))
    assert pixels.shape == (192, 384, 3)  # no manifest: one row, two cases
    assert sha(pixels) == "c4115e64269c6835bf289f40d4dd74435c7be5e30bb00efafad1346d607262d5"


def test_viz_imports_no_model_family():
    import subprocess
    import sys

    probe = (
        "import sys, medfm.viz; "
        "print([m for m in sys.modules if m.startswith(('medfm.seg', 'medfm.synth', "
        "'medfm.diffusion', 'medfm.engine'))])"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
