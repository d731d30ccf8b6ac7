"""The worker's smaller parts without sockets: the access log and application loading."""

from __future__ import annotations

import os
import sys
import time
from unittest import mock

import pytest

from circus_wsgi.accesslog import AccessLog, Entry
from circus_wsgi.appload import AppLoadError, load_app, load_mounts, prepare_path
from circus_wsgi.settings import Settings

ENVIRON = {"REQUEST_METHOD": "POST", "SERVER_PROTOCOL": "HTTP/1.1", "RAW_URI": "/a%20b?q=1",
           "SCRIPT_NAME": "/app", "PATH_INFO": "/a b", "QUERY_STRING": "q=1",
           "REMOTE_ADDR": "10.0.0.9", "HTTP_REFERER": "http://ref/", "HTTP_USER_AGENT": "ua/1",
           "HTTP_AUTHORIZATION": "Basic dXNlcjpwYXNz", "HTTP_X_TRACE": "t-1",
           "CONTENT_TYPE": "text/plain"}


def entry(**changes) -> Entry:
    fields = dict(environ=ENVIRON, status=201, sent=1234, started=1_700_000_000.0,
                  duration=0.0125)
    fields.update(changes)
    return Entry(**fields)


def test_default_format_is_gunicorns_combined():
    line = AccessLog("", Settings().access_log_format).line(entry())
    stamp = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(1_700_000_000))
    assert line == (f'10.0.0.9 - user {stamp} "POST /a%20b?q=1 HTTP/1.1" 201 1234 '
                    f'"http://ref/" "ua/1" 0.012500')


def test_every_atom():
    fmt = " ".join(f"%({atom})s" for atom in "hlmUqHsBbTMDp") + \
        " %({x-trace}i)s %({content-type}i)s %({missing}i)s %({CW_TEST_VAR}e)s %(zz)s"
    os.environ["CW_TEST_VAR"] = "env-value"
    try:
        line = AccessLog("", fmt).line(entry(sent=0))
    finally:
        del os.environ["CW_TEST_VAR"]
    assert line.split() == ["10.0.0.9", "-", "POST", "/app/a", "b", "q=1", "HTTP/1.1", "201",
                            "0", "-", "0", "12", "12500", f"<{os.getpid()}>", "t-1",
                            "text/plain", "-", "env-value", "-"]


def test_log_to_a_file(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "%(s)s %(r)s")
    assert log.enabled
    log.log(entry())
    log.log(entry(status=404))
    log.close()
    assert path.read_text() == "201 POST /a%20b?q=1 HTTP/1.1\n404 POST /a%20b?q=1 HTTP/1.1\n"


def test_lines_wait_for_the_flush_and_go_out_in_one_write(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "%(s)s %(s)s 100%% %(m)s")  # an atom twice, a literal %
    log.log(entry())
    log.log(entry(status=404))
    assert path.read_text() == ""  # kept until the worker's loop flushes
    with mock.patch("os.write", wraps=os.write) as write:
        log.flush()
    assert write.call_count == 1
    assert path.read_text() == "201 201 100% POST\n404 404 100% POST\n"
    log.flush()  # nothing kept: nothing written
    log.close()
    assert path.read_text().count("\n") == 2


def test_no_log():
    log = AccessLog("", "%(h)s")
    assert not log.enabled
    log.log(entry())


@pytest.mark.parametrize("fmt", ["%(h)d", "%(h)s %", "%(h"])
def test_bad_format_is_refused_with_the_setting_named(fmt):
    with pytest.raises(ValueError, match="access_log_format"):
        AccessLog("", fmt)


@pytest.fixture
def app_dir(tmp_path, monkeypatch):
    (tmp_path / "cw_app_ok.py").write_text(
        "def app(environ, start_response):\n    return []\n"
        "def make():\n    return app\n"
        "def broken():\n    raise RuntimeError('no database')\n"
        "not_callable = 3\n")
    (tmp_path / "cw_app_bad.py").write_text("import no_such_dependency\n")
    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    prepare_path(str(tmp_path))
    yield tmp_path
    sys.path[:] = path
    for name in ("cw_app_ok", "cw_app_bad"):
        sys.modules.pop(name, None)


def test_load_app_and_factory(app_dir):
    app = load_app("cw_app_ok:app")
    assert load_app("cw_app_ok:make()") is app
    assert load_mounts((("/x", "cw_app_ok:app"),)) == [("/x", app)]
    assert sys.path[0] == str(app_dir) and os.getcwd() == str(app_dir)


@pytest.mark.parametrize("spec, says", [
    ("cw_no_such_module:app", "cannot import 'cw_no_such_module'"),
    ("cw_app_bad:app", "ModuleNotFoundError: No module named 'no_such_dependency'"),
    ("cw_app_ok:missing", "has no attribute 'missing'"),
    ("cw_app_ok:broken()", "the factory failed: RuntimeError: no database"),
    ("cw_app_ok:not_callable", "int object is not callable"),
    ("cw_app_ok", "expected MODULE:CALLABLE"),
])
def test_load_errors_are_one_line(app_dir, spec, says):
    with pytest.raises(AppLoadError) as failure:
        load_app(spec)
    message = str(failure.value)
    assert says in message and spec in message and "\n" not in message


def test_bad_chdir_and_virtualenv(tmp_path):
    with pytest.raises(AppLoadError, match="setting 'chdir'"):
        prepare_path(str(tmp_path / "absent"))
    with pytest.raises(AppLoadError, match="setting 'virtualenv'"):
        prepare_path("", str(tmp_path))
