"""The memory guard (`medfm.io.memory`): the available figure and the one-line refusal."""

from pathlib import Path

import pytest

from medfm.errors import MedfmError
from medfm.io import available_memory, check_memory
from medfm.io.memory import MEMORY_LIMIT_ENV, format_bytes


def test_the_limit_can_be_set(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "18G")
    assert available_memory() == 18 * 2**30
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "512 MiB")
    assert available_memory() == 512 * 2**20
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "12345")
    assert available_memory() == 12345
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(MedfmError, match=f"{MEMORY_LIMIT_ENV}='lots' is not a size"):
        available_memory()


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="Linux figure")
def test_the_machine_figure_is_at_most_memavailable(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if "MemAvailable" in x)
    meminfo = int(line.split()[1]) * 1024
    got = available_memory()
    assert 0 < got <= meminfo * 1.1  # the cgroup's limit may be lower; MemAvailable moves


def test_check_memory_refuses_in_one_line(monkeypatch):
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "18G")
    check_memory(18 * 2**30, "exactly what is there")  # fits: no error
    check_memory(2**30, "a tenth", factor=10)
    with pytest.raises(MedfmError) as e:
        check_memory(2000**3 * 4, "a 2000x2000x2000 float32 volume", hint="crop it", factor=1.0)
    msg = str(e.value)
    assert msg == "a 2000x2000x2000 float32 volume needs ~30 GiB, 18 GiB memory available: crop it"
    with pytest.raises(MedfmError, match="needs ~36 GiB"):
        check_memory(2**30, "a tenth", factor=36)
    with pytest.raises(MedfmError, match="impossible size"):
        check_memory(float("nan"), "a NaN")


def test_without_a_figure_nothing_is_refused(monkeypatch):
    import medfm.io.memory as memory

    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    monkeypatch.setattr(memory, "_system_free", lambda: None)
    monkeypatch.setattr(memory, "_cgroup_free", lambda: None)
    assert available_memory() is None
    check_memory(2**80, "anything")


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(30 * 2**30) == "30 GiB"
    assert format_bytes(2**60) == "1024 PiB"
