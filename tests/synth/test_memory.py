"""`synth generate` sizes checked against the machine's memory before anything is written
(`medfm.synth.dataset.fit_batch`)."""

import pytest
import torch
from typer.testing import CliRunner

from medfm.cli.main import app
from medfm.errors import MedfmError
from medfm.io.memory import MEMORY_LIMIT_ENV
from medfm.synth.dataset import BYTES_PER_VOXEL, fit_batch, generate_dataset

CPU = torch.device("cpu")


def test_size_11585_is_refused_with_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "8G")
    out = tmp_path / "out"
    args = ["synth", "generate", "--out", str(out), "--size", "11585", "-n", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2
    assert r.output.strip() == (
        "error: rendering one 11585x11585 case needs ~15 GiB, 8.0 GiB memory available: "
        "choose a smaller --size"
    )
    assert not out.exists()


def test_a_1500_cubed_volume_and_workers_are_counted(tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "64G")
    out = tmp_path / "out"
    with pytest.raises(MedfmError, match="one 1500x1500x1500 case needs ~377 GiB, 64 GiB"):
        generate_dataset(out, dim=3, size=1500, n=2, modalities="ct,us")
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "8G")  # one 5000^2 MRI case fits, four do not
    with pytest.raises(MedfmError, match=r"per worker \(4 workers\) needs ~11 GiB, 8.0 GiB"):
        generate_dataset(out, dim=2, size=5000, n=8, workers=4, modalities="mri")
    assert not out.exists()


def test_only_the_batch_too_large_is_lowered(monkeypatch):
    per_case = 256 * 256 * BYTES_PER_VOXEL["mri"]
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(per_case * 5))
    with pytest.warns(UserWarning, match="--batch 16 of 256x256 cases needs .* rendering 5 at a"):
        assert fit_batch((256, 256), ("ct", "mri"), 16, 1, CPU) == 5
    assert fit_batch((256, 256), ("ct", "mri"), 16, 1, CPU, explicit=False) == 5  # quietly
    assert fit_batch((256, 256), ("ct", "mri"), 16, 2, CPU, explicit=False) == 2
    assert fit_batch((256, 256), ("ct",), 4, 1, CPU) == 4


def test_a_lowered_batch_gives_the_same_files(tmp_path, monkeypatch):
    a = generate_dataset(tmp_path / "a", size=64, n=3, batch=3, modalities="us")
    monkeypatch.setenv(MEMORY_LIMIT_ENV, str(64 * 64 * BYTES_PER_VOXEL["us"]))
    with pytest.warns(UserWarning, match="rendering 1 at a time"):
        b = generate_dataset(tmp_path / "b", size=64, n=3, batch=3, modalities="us")
    assert a.written == b.written == 3
    for f in sorted((tmp_path / "a").rglob("*.png")):
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()


def test_an_absurd_case_count_is_refused_with_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "8G")
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["synth", "generate", "--out", str(out), "-n", str(10**18)])
    assert r.exit_code == 2
    assert "keeping track of 1000000000000000000 cases needs ~" in r.output
    assert "--shard" in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_the_manifest_takes_a_generator_of_cases(tmp_path):
    from medfm.synth.manifest import read_manifest, write_manifest

    seen = []

    def cases():
        for i in range(3):
            seen.append(i)
            yield f"case_{i}", generate_spec_case(i)

    def generate_spec_case(i):
        from medfm.synth.case import SynthConfig, sample_case

        return sample_case(SynthConfig(), "ct", (32, 32), 0, i)

    write_manifest(tmp_path, cases(), 0)
    assert seen == [0, 1, 2]
    assert [r["case"] for r in read_manifest(tmp_path)] == ["case_0", "case_1", "case_2"]
