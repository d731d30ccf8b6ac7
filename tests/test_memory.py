"""glibc malloc tuning (circus_wsgi.memory)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from circus_wsgi.memory import ARENA_MAX, MMAP_THRESHOLD, TRIM_THRESHOLD, glibc_tunables


def test_the_settings_apply_on_glibc():
    code = ("from circus_wsgi.memory import tune_malloc; import sys; "
            "sys.exit(0 if tune_malloc() else 1)")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_glibc_tunables_carry_the_same_settings():
    assert glibc_tunables() == (f"glibc.malloc.arena_max={ARENA_MAX}"
                                f":glibc.malloc.mmap_threshold={MMAP_THRESHOLD}"
                                f":glibc.malloc.trim_threshold={TRIM_THRESHOLD}")


def test_glibc_reads_the_tunables():
    # glibc ignores a name it does not know: its loader lists the values it took
    loaders = glob.glob("/lib*/ld-linux*.so*")
    if not loaders:
        pytest.skip("no glibc dynamic loader")
    listed = subprocess.run([loaders[0], "--list-tunables"], capture_output=True, text=True,
                            env={**os.environ, "GLIBC_TUNABLES": glibc_tunables()},
                            timeout=30, check=True).stdout
    for name, value in [("arena_max", ARENA_MAX), ("mmap_threshold", MMAP_THRESHOLD),
                        ("trim_threshold", TRIM_THRESHOLD)]:
        assert f"glibc.malloc.{name}: {value:#x} " in listed
