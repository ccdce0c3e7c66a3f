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


def test_fill_encodes_each_processes_share_of_the_misses(tmp_path):
    ims = [image(i) for i in range(7)]
    cache = EmbeddingCache(tmp_path, "fake")
    cache.put(ims[0], torch.zeros(4, 3, 5))
    logs: list[str] = []
    enc = Encoder()
    # process 1 of 2 takes misses 1, 3, 5 of the six misses (ims 1..6): ims 2, 4, 6
    assert cache.fill(ims, enc, batch_size=2, rank=1, world=2, log=logs.append) == 3
    assert logs == ["embedding 6 images (cached for later epochs and runs)"]
    assert [im in cache for im in ims] == [True, False, True, False, True, False, True]
    assert enc.calls == [2, 1]  # rounds of 2 * batch_size images, batch_size per call
    assert torch.equal(cache.get(ims[2]), enc([ims[2]])[0].half().float())
    assert cache.fill(ims, enc, batch_size=2, log=logs.append) == 3  # the rest, in one process
    assert all(im in cache for im in ims)
    assert cache.fill(ims, Encoder(), log=logs.append) == 0 and len(logs) == 2
    assert cache.entry(ims[1]).input_size is None
    calls: list[tuple[int, int]] = []
    more = [image(i, 12) for i in range(7)]
    assert cache.fill(more, enc, batch_size=2, progress=lambda d, t: calls.append((d, t))) == 7
    assert calls == [(0, 7), (4, 7), (7, 7)]  # rounds of 2 * batch_size images
    with pytest.raises(MedfmError, match="rank 2 of world 2"):
        cache.fill(ims, enc, rank=2, world=2)
    with pytest.raises(MedfmError, match="batch_size"):
        cache.fill(ims, enc, batch_size=0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_seg_embed_writes_the_entries_training_writes(tmp_path):
    from typer.testing import CliRunner

    from medfm.cli.main import app
    from medfm.seg.models import BUNDLED_DIR
    from medfm.seg.prompts import PromptConfig
    from medfm.seg.train import TrainConfig, make_engine
    from medfm.synth.dataset import generate_dataset

    data = tmp_path / "ds"
    generate_dataset(data, modalities="ct,us", dim=2, n=3, size=48, seed=2)
    args = ["seg", "embed", "--data", str(data), "--cache", str(tmp_path / "embed"), "-m",
            "medfm-tiny", "-c", str(BUNDLED_DIR)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "3 images embedded" in r.output and "misses=6, writes=3" in r.output
    cfg = TrainConfig(
        model="medfm-tiny", checkpoint=str(BUNDLED_DIR), data=(str(data),),
        out=str(tmp_path / "run"), cache=str(tmp_path / "train"), steps=1,
        prompt=PromptConfig(refine_iters=0),
    )  # fmt: skip
    make_engine(cfg)

    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    embedded, trained = files(tmp_path / "embed"), files(tmp_path / "train")
    assert len(embedded) == 6 and embedded == trained
    r = CliRunner().invoke(app, args)  # everything cached: nothing encoded again
    assert r.exit_code == 0 and "hits=3, misses=0, writes=0" in r.output


def test_an_entry_of_another_shape_than_the_models_is_computed_again(tmp_path):
    """A stored embedding whose shape is not the model's (a foreign or damaged entry) is a
    miss: recomputed and stored again, never handed to training with the wrong shape."""
    image = np.full((8, 8, 3), 7, np.uint8)
    foreign = EmbeddingCache(tmp_path, "m:1")
    foreign.get_or_compute([image], lambda b: torch.ones(len(b), 4, 2, 2))
    cache = EmbeddingCache(tmp_path, "m:1", shape=(4, 3, 3))
    assert cache.get_array(image) is None
    cache.fill([image], lambda b: torch.full((len(b), 4, 3, 3), 2.0))
    assert cache.get_array(image).shape == (4, 3, 3)
    assert float(cache.get(image).mean()) == 2.0
