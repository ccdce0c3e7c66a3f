import numpy as np
import pytest
import torch
from PIL import Image

from medfm.errors import MedfmError
from medfm.io import Volume, read_image, read_png, write_png


def test_grey_round_trip_axis_order(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (24, 20), dtype=np.uint8)
    arr[0, 0], arr[23, 0] = 7, 250  # (row 0, col 0) top-left, (row 23, col 0) bottom-left
    write_png(Volume.from_array(arr), tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.size == (20, 24)  # PIL size is (W, H)
        assert im.getpixel((0, 23)) == 250
    back = read_png(tmp_path / "g.png")
    assert back.data.shape == (1, 24, 20) and back.data.dtype == torch.uint8
    np.testing.assert_array_equal(back.data[0].numpy(), arr)
    np.testing.assert_array_equal(back.affine, np.eye(4))
    assert back.spacing == (1.0, 1.0)


def test_rgb_round_trip_and_plain_tensor(tmp_path):
    rgb = torch.randint(0, 256, (3, 10, 20), dtype=torch.uint8)
    write_png(rgb, tmp_path / "c.png")
    back = read_png(tmp_path / "c.png")
    assert back.data.shape == (3, 10, 20)
    assert torch.equal(back.data, rgb)
    with Image.open(tmp_path / "c.png") as im:
        assert im.mode == "RGB"
        assert im.getpixel((19, 9)) == tuple(rgb[:, 9, 19].tolist())
    write_png(rgb[0], tmp_path / "hw.png")  # (H, W)
    assert torch.equal(read_png(tmp_path / "hw.png").data[0], rgb[0])


def test_16bit_rgba_palette_and_jpeg(tmp_path):
    a16 = (np.arange(10 * 20).reshape(10, 20) * 300).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "d.png")
    back = read_png(tmp_path / "d.png")
    assert back.data.dtype == torch.int32
    np.testing.assert_array_equal(back.data[0].numpy(), a16)

    rgba = np.random.default_rng(1).integers(0, 256, (10, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    back = read_png(tmp_path / "a.png")
    np.testing.assert_array_equal(back.data.numpy(), np.moveaxis(rgba[..., :3], -1, 0))

    labels = np.zeros((10, 20), np.uint8)
    labels[2:5, 3:9], labels[6:9, 10:] = 1, 2
    pal = Image.fromarray(labels, "L").convert("P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    pal.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.mode == "P"
    back = read_png(tmp_path / "p.png")
    assert back.data.shape == (1, 10, 20)
    np.testing.assert_array_equal(back.data[0].numpy(), labels)  # indices, not colours

    Image.fromarray(np.full((10, 20, 3), 128, np.uint8)).save(tmp_path / "j.jpg", quality=95)
    back = read_image(tmp_path / "j.jpg")
    assert back.data.shape == (3, 10, 20) and abs(int(back.data.float().mean()) - 128) <= 2


@pytest.mark.parametrize(
    "data, match",
    [
        (torch.zeros(1, 10, 20, dtype=torch.float32), "uint8"),
        (torch.zeros(2, 10, 20, dtype=torch.uint8), "shape"),
        (torch.zeros(1, 4, 10, 20, dtype=torch.uint8), "shape"),
    ],
)
def test_write_refuses(tmp_path, data, match):
    with pytest.raises(MedfmError, match=match):
        write_png(data, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_lossy_ending_and_read_errors(tmp_path):
    with pytest.raises(MedfmError, match=r"\.png"):
        write_png(torch.zeros(10, 20, dtype=torch.uint8), tmp_path / "x.jpg")
    with pytest.raises(MedfmError, match="does not exist"):
        read_png(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(MedfmError, match="bad.png"):
        read_png(tmp_path / "bad.png")
    write_png(torch.zeros(10, 20, dtype=torch.uint8), tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(MedfmError, match="cut.png"):
        read_png(tmp_path / "cut.png")
