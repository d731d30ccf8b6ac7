"""The ``mongrel2`` setting: which binary it names, the library path it runs with, and
one line with exit status 2 from ``circus-wsgi config`` when it cannot run.

Unit tests locate stand-in files (locating runs nothing); the checks run real
programs: the real mongrel2, /bin/true, a script that fails like the dynamic
loader does, and the prefix binary without its libraries where there is one.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from circus_wsgi import mongrel2_binary
from circus_wsgi.mongrel2_binary import (
    Mongrel2Binary, Mongrel2Unavailable, check, library_path, locate, usable_mongrel2)
from circus_wsgi.settings import Settings, SettingsError

CIRCUS_WSGI = Path(sys.executable).with_name("circus-wsgi")
HINT = "install Debian's mongrel2-core: make deps does it"


def executable(path: Path, text: str = "#!/bin/sh\nexit 1\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def prefix_with_libraries(root: Path) -> Path:
    """A prefix laid out as make deps unpacks one: usr/bin/mongrel2 and a library."""
    executable(root / "usr" / "lib" / "x86_64-linux-gnu" / "libmbedtls.so.14", "")
    return executable(root / "usr" / "bin" / "mongrel2")


@pytest.fixture
def no_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mongrel2_binary, "PREFIX_BINARY", tmp_path / "none" / "mongrel2")


def test_the_setting_is_declared_once_with_a_flag_and_an_empty_default() -> None:
    assert Settings().mongrel2 == ""
    assert Settings(mongrel2="/opt/m2/bin/mongrel2").to_argv() == [
        "--mongrel2", "/opt/m2/bin/mongrel2"]
    with pytest.raises(SettingsError, match="setting 'mongrel2'.*must be a string"):
        Settings(mongrel2=3)


def test_the_default_is_the_prefix_binary_when_make_deps_unpacked_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = prefix_with_libraries(tmp_path / "mongrel2")
    monkeypatch.setattr(mongrel2_binary, "PREFIX_BINARY", binary)
    executable(tmp_path / "path" / "mongrel2")
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    found = locate("")
    assert found.path == str(binary)
    assert found.library_path == (str(tmp_path / "mongrel2/usr/lib/x86_64-linux-gnu"),)
    assert found.environment() == {
        "LD_LIBRARY_PATH": str(tmp_path / "mongrel2/usr/lib/x86_64-linux-gnu")}


def test_the_default_is_mongrel2_on_path_without_a_prefix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_prefix: None) -> None:
    on_path = executable(tmp_path / "path" / "mongrel2")
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty'}:{tmp_path / 'path'}")
    assert locate("") == Mongrel2Binary(str(on_path), ())


def test_the_prefix_default_is_the_real_venv_prefix() -> None:
    assert mongrel2_binary.PREFIX_BINARY == Path(sys.prefix, "mongrel2/usr/bin/mongrel2")


def test_no_mongrel2_anywhere_is_one_line_naming_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_prefix: None) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Mongrel2Unavailable) as raised:
        locate("")
    message = str(raised.value)
    assert message == (f"mongrel2 is not installed (neither {tmp_path}/none/mongrel2 nor "
                       f"mongrel2 on PATH): {HINT} (where the system has none, it fetches "
                       "Debian 12's into .venv/mongrel2)")
    assert isinstance(raised.value, SettingsError)


def test_a_path_or_a_command_name_can_be_set(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    binary = executable(tmp_path / "opt" / "bin" / "m2")
    monkeypatch.chdir(tmp_path)
    assert locate("opt/bin/m2").path == str(binary)  # relative: from the working directory
    monkeypatch.setenv("PATH", str(binary.parent))
    assert locate("m2").path == str(binary)


@pytest.mark.parametrize("name, make, problem", [
    ("absent", lambda p: None, "does not exist"),
    ("not-executable", lambda p: p.write_text(""), "is not an executable file"),
    ("directory", lambda p: p.mkdir(), "is not an executable file"),
])
def test_a_set_path_that_is_no_program_is_one_line(tmp_path: Path, name: str, make,
                                                   problem: str) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(Mongrel2Unavailable) as raised:
        locate(str(path))
    assert str(raised.value).startswith(f"setting 'mongrel2': {path} {problem}: {HINT}")
    assert "\n" not in str(raised.value)


def test_a_set_name_not_on_path_is_one_line(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Mongrel2Unavailable, match="^setting 'mongrel2': mongrel2 is not on "
                                                  "PATH: install Debian's mongrel2-core"):
        locate("mongrel2")


@pytest.mark.parametrize("binary", ["/usr/bin/mongrel2", "/usr/local/bin/mongrel2",
                                    "/bin/mongrel2"])
def test_a_binary_of_the_system_gets_no_library_path(binary: str) -> None:
    assert library_path(binary) == ()


def test_the_library_path_is_the_prefix_lib_dirs_that_hold_libraries(tmp_path: Path) -> None:
    binary = executable(tmp_path / "opt" / "bin" / "mongrel2")
    (tmp_path / "opt" / "lib" / "x86_64-linux-gnu").mkdir(parents=True)  # empty: left out
    assert library_path(str(binary)) == ()
    executable(tmp_path / "opt" / "lib" / "libzmq.so.5", "")
    assert library_path(str(binary)) == (str(tmp_path / "opt" / "lib"),)
    link = executable(tmp_path / "elsewhere" / "bin" / "placeholder").with_name("mongrel2")
    link.symlink_to(binary)  # a symlink to a prefix's binary: the prefix's libraries
    assert library_path(str(link)) == (str(tmp_path / "opt" / "lib"),)


def test_the_real_mongrel2_passes_the_check(mongrel2_binary: Mongrel2Binary) -> None:
    check(mongrel2_binary, "")
    assert mongrel2_binary.tool("m2sh") is not None


def test_a_program_that_is_not_mongrel2_fails_the_check() -> None:
    with pytest.raises(Mongrel2Unavailable, match="^setting 'mongrel2': /bin/true is not "
                       "mongrel2 .run without arguments, it exited 0 without 'usage: "):
        check(Mongrel2Binary("/bin/true"), "/bin/true")


def test_a_missing_library_is_named(tmp_path: Path) -> None:
    loader_failure = executable(tmp_path / "mongrel2", (
        "#!/bin/sh\necho \"$0: error while loading shared libraries: libmbedtls.so.14: "
        "cannot open shared object file: No such file or directory\" >&2\nexit 127\n"))
    with pytest.raises(Mongrel2Unavailable) as raised:
        usable_mongrel2(str(loader_failure))
    assert str(raised.value).startswith(
        f"setting 'mongrel2': cannot run {loader_failure}: its library libmbedtls.so.14 is "
        f"missing: {HINT}")


def test_the_prefix_binary_does_not_run_without_its_library_path(
        mongrel2_prefix: Mongrel2Binary) -> None:
    if ctypes.util.find_library("mbedtls") != "libmbedtls.so.14":  # Debian 13: 3.6's
        with pytest.raises(Mongrel2Unavailable, match="its library libmbedtls.so.14 is "):
            check(Mongrel2Binary(mongrel2_prefix.path), "")
    check(mongrel2_prefix, "")  # with it, it does, wherever this runs


def test_config_with_a_mongrel2_that_does_not_exist_is_one_line_and_exit_2(
        tmp_path: Path) -> None:
    missing = tmp_path / "mongrel2"
    result = subprocess.run([str(CIRCUS_WSGI), "config", "examples.hello:app", "--out",
                             str(tmp_path / "out"), "--mongrel2", str(missing)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"circus-wsgi: error: setting 'mongrel2': {missing} does not "
                             f"exist: {HINT} (where the system has none, it fetches Debian "
                             "12's into .venv/mongrel2)\n")
    assert not (tmp_path / "out").exists()


def test_config_with_a_mongrel2_not_on_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([str(CIRCUS_WSGI), "config", "examples.hello:app", "--out",
                             str(tmp_path / "out"), "--mongrel2", "mongrel2"],
                            env={**os.environ, "PATH": str(tmp_path)}, capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith("circus-wsgi: error: setting 'mongrel2': mongrel2 is not "
                                    "on PATH: install Debian's mongrel2-core")
    assert len(result.stderr.splitlines()) == 1
