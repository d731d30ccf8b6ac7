"""``circus-wsgi config``, ``write_configs`` and examples/deploy.py write three files that
m2sh and circus read back as the Settings said."""

from __future__ import annotations

import shlex
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from circus.config import get_config

from circus_wsgi import Settings, write_configs
from circus_wsgi.deploy import resolve_for
from harness import m2sh

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "examples" / "static"
CIRCUS_WSGI = Path(sys.executable).with_name("circus-wsgi")
FILES = ("config.sqlite", "mongrel2.conf", "circus.ini")
FLAGS = ["--static", "/static=examples/static", "--mounts", "/api=examples.hello:app",
         "--bind", "127.0.0.1:8123", "--workers", "3"]


def workers_watcher(circus_ini: Path) -> dict:
    """The workers watcher as circus's own loader reads it."""
    return {w["name"]: w for w in get_config(str(circus_ini))["watchers"]}["workers"]


def m2sh_lines(*args: str) -> list[str]:
    """The lines m2sh prints below its title and rule."""
    result = m2sh(*args)
    assert "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert set(lines[1]) == {"-"}, result.stdout
    return [line.strip() for line in lines[2:]]


@pytest.fixture(scope="module")
def written() -> Iterator[tuple[Path, str, Settings]]:
    """``circus-wsgi config`` run once: (out dir, its stdout, the Settings it was given)."""
    with tempfile.TemporaryDirectory(prefix="cw-test-", dir="/tmp") as name:
        out = Path(name) / "out"
        result = subprocess.run([str(CIRCUS_WSGI), "config", "examples.hello:app", "--out",
                                 str(out), *FLAGS], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        settings = Settings(app="examples.hello:app", static={"/static": str(STATIC)},
                            mounts={"/api": "examples.hello:app"}, bind="127.0.0.1:8123",
                            workers=3, chdir=str(ROOT))
        yield out, result.stdout, resolve_for(settings, out)


def test_config_writes_three_files_and_prints_their_paths(
        written: tuple[Path, str, Settings]) -> None:
    out, stdout, _ = written
    assert stdout.splitlines() == [f"wrote {out / name}" for name in FILES]
    assert sorted(path.name for path in out.iterdir()) == sorted([*FILES, "run"])


def test_run_dir_is_private_and_circus_ini_is_not_readable_by_others(
        written: tuple[Path, str, Settings]) -> None:
    out, _, _ = written
    assert stat.S_IMODE((out / "run").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "run" / "uploads").stat().st_mode) == 0o700
    assert stat.S_IMODE((out / "circus.ini").stat().st_mode) == 0o600


def test_m2sh_lists_what_the_settings_said(written: tuple[Path, str, Settings]) -> None:
    out, _, settings = written
    db = str(out / "config.sqlite")
    assert m2sh_lines("servers", "-db", db) == [f"circus-wsgi localhost {settings.server_uuid}"]
    assert m2sh_lines("hosts", "-db", db, "-server", "circus-wsgi") == ["1 localhost"]
    assert sorted(m2sh_lines("routes", "-db", db, "-server", "circus-wsgi", "-host",
                       "localhost")) == ["/", "/api", "/static/"]


def test_circus_ini_runs_what_the_settings_said(written: tuple[Path, str, Settings]) -> None:
    out, _, settings = written
    workers = workers_watcher(out / "circus.ini")
    argv = shlex.split(workers["cmd"])
    assert argv == [sys.executable, "-m", "circus_wsgi", "worker", *settings.to_argv()]
    assert "--run-dir" in argv and str(out / "run") in argv
    assert workers["numprocesses"] == 3 and workers["working_dir"] == str(ROOT)


def test_write_configs_resolves_run_dir_and_chdir(run_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(run_dir)
    paths = write_configs(Settings(app="examples.hello:app"), "deploy")
    assert paths == {name: run_dir / "deploy" / name for name in FILES}
    assert all(path.is_file() for path in paths.values())
    assert get_config(str(paths["circus.ini"]))["endpoint"] == (
        f"ipc://{run_dir}/deploy/run/circus.sock")
    assert workers_watcher(paths["circus.ini"])["working_dir"] == str(run_dir)
    assert write_configs(Settings(app="examples.hello:app"), run_dir / "deploy") == paths


def test_an_explicit_run_dir_is_kept(run_dir: Path) -> None:
    run_dir = run_dir / "elsewhere"
    write_configs(Settings(app="examples.hello:app", run_dir=str(run_dir)), run_dir / "out")
    assert run_dir.is_dir() and not (run_dir / "out" / "run").exists()
    assert f"ipc://{run_dir}/circus.sock" in (run_dir / "out" / "circus.ini").read_text()


def test_deploy_example(run_dir: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "deploy.py"),
                             str(run_dir / "hello")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in FILES:
        assert f"{name}: {run_dir / 'hello' / name}" in result.stdout
    workers = workers_watcher(run_dir / "hello" / "circus.ini")
    assert workers["working_dir"] == str(ROOT) and workers["numprocesses"] == 2


def test_deploy_example_needs_a_directory() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "deploy.py")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("usage:")


# -- the app is imported first, as serve and the workers import it


def config(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CIRCUS_WSGI), "config", "--out", str(out), "--chdir",
                           str(ROOT / "tests"), *flags], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("flags, last_line", [
    (["serve_apps:app", "--env", "SERVE_APPS_IMPORT_ERROR=no database"],
     "application 'serve_apps:app': cannot import 'serve_apps': RuntimeError: no database"),
    (["serve_apps:nothing"], "module 'serve_apps' has no attribute 'nothing'"),
    (["serve_apps:from_env()"], "the factory failed: KeyError: 'SERVE_APPS_GREETING'"),
    (["serve_apps:app", "--mounts", "/x=no_such_module:app"],
     "cannot import 'no_such_module': ModuleNotFoundError"),
], ids=["import-error", "missing-attribute", "factory-error", "mount"])
def test_config_of_an_app_that_does_not_import_is_one_line_and_writes_nothing(
        run_dir: Path, flags: list[str], last_line: str) -> None:
    result = config(run_dir / "out", *flags)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(
        "circus-wsgi: error: ") and last_line in result.stderr, result.stderr
    assert not (run_dir / "out").exists()


def test_config_imports_with_the_settings_env_and_chdir(run_dir: Path) -> None:
    result = config(run_dir / "out", "serve_apps:from_env()", "--env",
                    "SERVE_APPS_GREETING=hello")
    assert result.returncode == 0, result.stderr
    assert (run_dir / "out" / "circus.ini").is_file()


def test_no_check_app_writes_for_an_app_this_machine_cannot_import(run_dir: Path) -> None:
    result = config(run_dir / "out", "not_here.wsgi:application", "--no-check-app")
    assert result.returncode == 0, result.stderr
    assert workers_watcher(run_dir / "out" / "circus.ini")["cmd"].split()[4] == \
        "not_here.wsgi:application"
