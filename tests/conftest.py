"""Shared fixtures: short private run directories and the real binaries."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def run_dir():
    """A fresh private directory with a short path (ipc paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cw-test-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mongrel2_binary() -> str:
    path = shutil.which("mongrel2")
    if path is None:
        pytest.fail("mongrel2 is not installed: run `make test`, which installs mongrel2-core")
    return path
