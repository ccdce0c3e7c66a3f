"""medfm.threads: idle OpenMP threads spin briefly then sleep, the thread count follows
MEDFM_THREADS or the CPUs the process may use, and a user's own settings win. Each case runs in
a fresh process: the settings act before torch is loaded."""

import os
import subprocess
import sys

import pytest

PROBE = (
    "import os, sys; from medfm.threads import configure_threads; n = configure_threads(); "
    "import torch; print(n, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'), "
    "torch.get_num_threads())"
)


OMP_VARS = (
    "OMP_WAIT_POLICY",
    "OMP_NUM_THREADS",
    "GOMP_SPINCOUNT",
    "KMP_BLOCKTIME",
    "MEDFM_THREADS",
)


def probe(env: dict[str, str], prefix: tuple[str, ...] = ()) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    r = subprocess.run(
        [*prefix, sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout.split()


def test_default_is_a_short_spin_and_torchs_thread_count():
    import torch

    n, policy, spin, threads = probe({})
    if len(os.sched_getaffinity(0)) == os.cpu_count():
        assert n == "None"
    assert (policy, spin) == ("None", "10000")
    assert int(threads) <= max(len(os.sched_getaffinity(0)), torch.get_num_threads())


def test_the_users_settings_win():
    assert probe({"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "1"}) == [
        "None", "ACTIVE", "None", "1"
    ]  # fmt: skip
    assert probe({"GOMP_SPINCOUNT": "7"})[2] == "7"


def test_medfm_threads_sets_the_count():
    assert probe({"MEDFM_THREADS": "1", "OMP_NUM_THREADS": "2"}) == ["1", "None", "10000", "1"]


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or (os.cpu_count() or 1) < 2, reason="needs 2 CPUs"
)
def test_the_count_follows_the_cpus_the_process_may_use():
    assert probe({}, ("taskset", "-c", "0")) == ["1", "None", "10000", "1"]


def test_importing_medfm_sets_the_wait_policy_only():
    code = (
        "import os, sys, medfm; "
        "print(os.environ.get('GOMP_SPINCOUNT'), 'OMP_NUM_THREADS' in os.environ, "
        "'torch' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["10000", "False", "False"]


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_medfm_threads_is_one_line_and_exit_2(value):
    env = {**os.environ, "MEDFM_THREADS": value}
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "info"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr == (
        f"error: MEDFM_THREADS={value!r} must be a whole number >= 1; unset it or fix it\n"
    )
    assert r.stdout == ""


def test_the_cli_applies_medfm_threads():
    env = {**os.environ, "MEDFM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "medfm.cli.main", "info"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert ", threads 1," in r.stdout
