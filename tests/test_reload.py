"""``--reload``: what the reloader watches, and on the real stack a changed file picked up
under load with no failed request, a broken edit that leaves the old workers serving,
and ``--reload-extra-file``."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from watchfiles import Change

from circus_stack import Load
from circus_wsgi.reloader import check_available, watched
from circus_wsgi.settings import Settings, SettingsError
from harness import wait_for
from test_serve import Serve, assert_nothing_left, scratch, start_serve

#: The application the tests edit: a greeting in its code, a text read from a template.
APP_TEXT = '''\
from pathlib import Path

GREETING = "{greeting}"
EXTRA = (Path(__file__).parent / "templates" / "extra.txt").read_text().strip()


def app(environ, start_response):
    body = f"{{GREETING}} {{EXTRA}}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''
#: The issue's promise: a change is served within this many seconds.
RELOADED_WITHIN = 2.0


@pytest.fixture
def project() -> Iterator[Path]:
    """A small application in a directory of its own (the tests change its files)."""
    with scratch() as path:
        (path / "templates").mkdir()
        (path / "templates" / "extra.txt").write_text("plain\n")
        write_app(path, "one")
        yield path


def write_app(project: Path, greeting: str) -> None:
    (project / "reload_app.py").write_text(APP_TEXT.format(greeting=greeting))


def serve_reloading(project: Path, *flags: str) -> Serve:
    served = start_serve(project, "--reload", "--chdir", str(project), *flags,
                         app="reload_app:app")
    expect(served, lambda: "reloader on (for development): watching" in served.output(),
           "the reloader to watch")
    return served


def expect(served: Serve, condition: Callable[[], object], what: str,
           timeout: float = 20.0) -> None:
    """Wait for ``condition``; on a timeout, fail with the end of serve's output."""
    try:
        wait_for(condition, timeout, 0.02, what)
    except AssertionError as error:
        raise AssertionError(f"{error}; serve's output ends:\n{served.output()[-4000:]}"
                             ) from None


def changed_within(served: Serve, expected: bytes, timeout: float = 10.0) -> float:
    """Seconds until ``/`` answers ``expected`` first (AssertionError past ``timeout``)."""
    started = time.monotonic()
    expect(served, lambda: served.get("/").body.startswith(expected), f"the answer {expected!r}",
           timeout)
    return time.monotonic() - started


# --------------------------------------------------------------------------
# What is watched


def test_python_files_under_chdir_and_the_extra_paths_count(project: Path) -> None:
    extra_file = project.parent / f"{project.name}-settings.toml"
    extra_file.write_text("x = 1\n")
    try:
        settings = Settings(app="reload_app:app", chdir=str(project), reload=True,
                            reload_extra_files=[str(project / "templates"), str(extra_file)])
        trees, alone, counts = watched(settings)
    finally:
        extra_file.unlink()
    assert trees == [str(project)]  # templates is in it
    assert alone == [str(project.parent)]  # editors replace a file: its directory, not below
    modified = Change.modified
    assert counts(modified, str(project / "reload_app.py"))
    assert counts(modified, str(project / "pkg" / "deep" / "mod.py"))
    assert counts(modified, str(project / "templates" / "page.html"))
    assert counts(modified, str(extra_file))
    assert not counts(modified, str(project / "notes.txt"))
    assert not counts(modified, str(project / "__pycache__" / "reload_app.cpython-311.pyc"))
    assert not counts(modified, str(project / ".git" / "hooks" / "pre-commit.py"))
    assert not counts(modified, str(project.parent / "other.py"))  # beside chdir, not in it
    assert not counts(modified, str(project.parent / "other.toml"))


def test_reload_needs_watchfiles(monkeypatch: pytest.MonkeyPatch) -> None:
    check_available(Settings(reload=True))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "watchfiles" else real(name, *a))
    with pytest.raises(SettingsError, match="needs the watchfiles package"):
        check_available(Settings(reload=True))
    check_available(Settings())  # without reload, nothing is needed


# --------------------------------------------------------------------------
# On the real stack


def test_a_changed_file_reloads_the_workers_under_load_with_no_failed_request(
        project: Path) -> None:
    served = serve_reloading(project, "--workers", "2")
    try:
        before = served.pids("workers")
        with Load(served.port, ["/"] * 4) as load:
            time.sleep(0.5)
            write_app(project, "two")
            seconds = changed_within(served, b"two plain")
            time.sleep(0.5)  # and the new workers keep serving
        print(f"reloaded within {seconds:.2f} s")
        assert not load.failures(), load.failures()[:5]
        assert len(load.outcomes) > 50
        assert seconds < RELOADED_WITHIN
        wait_for(lambda: not served.pids("workers") & before, 10, 0.1, "the old workers to go")
        assert "reload_app.py changed: reloading the workers" in served.output()
    finally:
        assert served.stop() == 0
    assert_nothing_left(project)  # the reloader too


def test_a_broken_edit_leaves_the_old_workers_serving(project: Path) -> None:
    served = serve_reloading(project)
    try:
        (project / "reload_app.py").write_text("GREETING = 'unfinished\n")
        expect(served, lambda: "not reloading, the workers go on with the old code" in
               served.output(), "the reloader to refuse the broken edit")
        assert served.get("/").body.startswith(b"one plain")
        write_app(project, "three")
        changed_within(served, b"three plain")
    finally:
        served.stop()


def test_an_extra_file_reloads_the_workers_too(project: Path) -> None:
    served = serve_reloading(project, "--reload-extra-file", str(project / "templates"))
    try:
        (project / "templates" / "extra.txt").write_text("templated\n")
        assert changed_within(served, b"one templated") < RELOADED_WITHIN
    finally:
        served.stop()
