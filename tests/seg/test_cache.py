import json

import numpy as np
import pytest
import torch

from medfm.errors import MedfmError
from medfm.seg.cache import CacheEntry, EmbeddingCache


def image(seed: int, h: int = 10, w: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


class Encoder:
    """A fake encoder (B images -> (B, 4, 3, 5)) that counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        self.calls.append(len(images))
        out = [torch.from_numpy(im[:3, :5].astype(np.float32)).permute(2, 0, 1) for im in images]
        return torch.stack([torch.cat([o, o[:1] / 7]) for o in out])  # (B, 4, 3, 5)


def test_round_trip_within_fp16_and_memory_mapped(tmp_path):
    cache = EmbeddingCache(tmp_path, "vit_b:test")
    im = image(0)
    emb = torch.randn(8, 4, 6, generator=torch.Generator().manual_seed(0)) * 10
    assert cache.get(im) is None
    cache.put(im, emb, input_size=(512, 1024))
    got = cache.get(im)
    assert got.dtype == torch.float32 and got.shape == (8, 4, 6)
    assert torch.allclose(got, emb, rtol=1e-3, atol=1e-3)
    assert torch.equal(got, emb.half().float())
    arr = cache.get_array(im)
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and not arr.flags.writeable
    assert cache.entry(im) == CacheEntry("vit_b:test", (8, 4, 6), (10, 20), (512, 1024))
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    key = cache.key(im)
    assert files == [f"{key}.json", f"{key}.npy"]  # no temporary files left
    np.load(next(tmp_path.rglob("*.npy")), allow_pickle=False)  # a plain .npy


def test_hits_misses_and_model_id(tmp_path):
    a = EmbeddingCache(tmp_path, "vit_b:a")
    im = image(1)
    a.put(im, torch.ones(2, 3, 4))
    assert a.get(im) is not None and a.get(im.copy()) is not None
    assert a.get(image(2)) is None
    assert (a.stats().hits, a.stats().misses, a.stats().writes) == (2, 1, 1)
    b = EmbeddingCache(tmp_path, "vit_b:b")
    assert b.get(im) is None and b.stats().misses == 1
    assert im in a and im not in b


def test_key_depends_on_shape_and_dtype(tmp_path):
    cache = EmbeddingCache(tmp_path, "m")
    im = image(3)
    assert cache.key(im) == cache.key(im.copy())
    assert cache.key(im) != cache.key(im.reshape(20, 10, 3))
    assert cache.key(im[..., 0]) != cache.key(im[..., 0].view(np.int8))
    assert cache.key(np.asfortranarray(im)) == cache.key(im)


def test_get_or_compute_encodes_only_misses(tmp_path):
    cache = EmbeddingCache(tmp_path, "tiny")
    enc = Encoder()
    ims = [image(i) for i in range(5)]
    cache.put(ims[1], enc([ims[1]])[0])
    enc.calls.clear()
    batch = [ims[0], ims[1], ims[2], ims[0].copy(), ims[3], ims[4]]
    out = cache.get_or_compute(batch, enc, batch_size=2, input_size=lambda hw: (hw[0] * 2, hw[1]))
    assert enc.calls == [2, 2]  # 4 distinct misses, the duplicate and the hit not encoded
    assert out.shape == (6, 4, 3, 5) and out.dtype == torch.float32
    expected = enc(batch).half().float()
    assert torch.equal(out, expected)
    assert cache.entry(ims[2]).input_size == (20, 20)
    enc.calls.clear()
    again = cache.get_or_compute(batch, enc, batch_size=2)
    assert enc.calls == [] and torch.equal(again, out)  # the rerun sees the same numbers


def test_truncated_or_partial_entries_are_recomputed(tmp_path):
    cache = EmbeddingCache(tmp_path, "tiny")
    enc = Encoder()
    ims = [image(10), image(11), image(12)]
    first = cache.get_or_compute(ims, enc, batch_size=8)
    key0, key1, key2 = (cache.key(im) for im in ims)
    npy0 = next(tmp_path.rglob(f"{key0}.npy"))
    npy0.write_bytes(npy0.read_bytes()[:-10])  # truncated data
    next(tmp_path.rglob(f"{key1}.json")).unlink()  # killed between the two writes
    meta2 = next(tmp_path.rglob(f"{key2}.json"))
    meta2.write_text(json.dumps({**json.loads(meta2.read_text()), "shape": [9, 9, 9]}))
    assert cache.get(ims[0]) is None and cache.get(ims[1]) is None and cache.get(ims[2]) is None
    enc.calls.clear()
    again = cache.get_or_compute(ims, enc, batch_size=8)
    assert enc.calls == [3] and torch.equal(again, first)
    assert all(cache.get(im) is not None for im in ims)


def test_pickled_file_is_never_loaded(tmp_path):
    cache = EmbeddingCache(tmp_path, "tiny")
    im = image(20)
    cache.put(im, torch.zeros(1, 2, 2))
    npy = next(tmp_path.rglob("*.npy"))
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert cache.get(im) is None


def test_errors(tmp_path):
    cache = EmbeddingCache(tmp_path, "tiny")
    with pytest.raises(MedfmError, match="B = 2"):
        cache.get_or_compute([image(0), image(1)], lambda ims: torch.zeros(1, 2, 3, 3))
    with pytest.raises(MedfmError, match="float16"):
        cache.put(image(0), torch.full((1, 2, 2), 1e6))
    with pytest.raises(MedfmError, match="C, h, w"):
        cache.put(image(0), torch.zeros(2, 2))
    with pytest.raises(MedfmError, match="numpy"):
        cache.get(torch.zeros(4, 4, 3))
    with pytest.raises(MedfmError, match="model_id"):
        EmbeddingCache(tmp_path, "")
