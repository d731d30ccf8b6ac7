"""Shared fixtures: short private run directories and the real binaries."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from circus_wsgi.compiled import HOT_MODULES, compiled_modules
from circus_wsgi.mongrel2_binary import (
    Mongrel2Binary, Mongrel2Unavailable, locate, usable_mongrel2)

PROJECT_DIR = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """With CIRCUS_WSGI_EXPECT_COMPILED=1 (scripts/test-compiled), the hot modules must
    be the compiled ones: else the run would test the pure-Python ones a second time."""
    if os.environ.get("CIRCUS_WSGI_EXPECT_COMPILED") == "1":
        for name in HOT_MODULES:
            importlib.import_module(f"circus_wsgi.{name}")
        pure = sorted(set(HOT_MODULES) - set(compiled_modules()))
        if pure:
            raise pytest.UsageError(f"not compiled: {', '.join(pure)}")
#: Debian 12's mbedTLS 2.28, which mongrel2 links and Debian 13 no longer has.
MBEDTLS_PACKAGES = ("libmbedtls14", "libmbedx509-1", "libmbedcrypto7")


@pytest.fixture
def run_dir():
    """A fresh private directory with a short path (ipc paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="cw-test-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def mongrel2_binary() -> Mongrel2Binary:
    """The mongrel2 the ``mongrel2`` setting's default names, checked to run."""
    try:
        return usable_mongrel2("")
    except Mongrel2Unavailable as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def mongrel2_prefix() -> Iterator[Mongrel2Binary]:
    """A mongrel2 in a prefix of its own, with Debian 12's mbedTLS in the prefix: the
    default one where make deps fetched it (Debian 13), else one that
    scripts/install-mongrel2 fetches here from the Debian registry (removed afterwards)."""
    default = locate("")
    if default.library_path:
        yield default
        return
    if shutil.which("apt-get") is None:
        pytest.skip("no apt-get to fetch Debian's mongrel2-core with")
    directory = Path(tempfile.mkdtemp(prefix="cw-prefix-", dir="/tmp"))
    try:
        result = subprocess.run(
            [str(PROJECT_DIR / "scripts" / "install-mongrel2"), "--fetch",
             str(directory / "mongrel2"), *MBEDTLS_PACKAGES],
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        yield locate(str(directory / "mongrel2" / "usr" / "bin" / "mongrel2"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
