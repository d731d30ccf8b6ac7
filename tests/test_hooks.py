"""Server hooks (gunicorn's): how a function reaches the workers, and every hook on the
real stack — called in order with its arguments, a raising hook survived, on_starting
stopping the start, and the worker hooks of ``config`` files under plain circusd."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

import hook_apps
from circus_stack import CircusStack
from circus_wsgi import callref, hooks
from circus_wsgi.settings import Settings, SettingsError
from circus_wsgi.wsgi import Exchange
from harness import PROJECT_DIR, TESTS_DIR, HTTPClient, python_env, wait_for
from test_serve import APP, CIRCUS_WSGI, preflight, scratch, start_serve

#: A settings file with every hook, defined in it as a gunicorn.conf.py defines them.
SITE = '''\
from circus_wsgi import Settings
import hook_apps as seen


def on_starting(server):
    seen.record("on_starting", **seen.server(server))


def when_ready(server):
    seen.record("when_ready", **seen.server(server))


def post_worker_init(worker):
    seen.record("post_worker_init", **seen.worker(worker))


def pre_request(worker, req):
    seen.record("pre_request", **seen.worker(worker), **seen.req(req))


def post_request(worker, req, environ, resp):
    seen.record("post_request", **seen.worker(worker), **seen.req(req),
                **seen.resp(environ, resp))


def worker_exit(server, worker):
    seen.record("worker_exit", **seen.server(server), **seen.worker(worker))


def on_exit(server):
    seen.record("on_exit", **seen.server(server))


settings = Settings(app="serve_apps:app", workers=1, on_starting=on_starting,
                    when_ready=when_ready, post_worker_init=post_worker_init,
                    pre_request=pre_request, post_request=post_request,
                    worker_exit=worker_exit, on_exit=on_exit)
'''
WORKER_HOOKS = ["post_worker_init", "pre_request", "post_request", "worker_exit"]
ALL_HOOKS = ["on_starting", "when_ready", "on_exit", *WORKER_HOOKS]


@pytest.fixture
def site(run_dir: Path) -> Path:
    path = run_dir / "site.py"
    path.write_text(SITE)
    return path


def hook_env(record: Path, raising: list[str] = ()) -> dict:
    """serve's environment: the settings file imports hook_apps from tests/."""
    return {"HOOK_RECORD": str(record), "HOOK_RAISE": ",".join(raising),
            "PYTHONPATH": f"{python_env()['PYTHONPATH']}{os.pathsep}{TESTS_DIR}"}


# --------------------------------------------------------------------------
# Functions as settings


def a_hook(server):
    pass


def test_a_function_of_a_module_is_written_as_module_colon_name() -> None:
    settings = Settings(on_exit=hook_apps.record, when_ready=a_hook)
    assert settings.on_exit is hook_apps.record
    assert settings.to_argv() == ["--when-ready", f"{__name__}:a_hook",
                                  "--on-exit", "hook_apps:record"]


def test_a_function_of_a_settings_file_is_written_as_its_path_and_name(site: Path) -> None:
    settings = Settings.from_file(site)
    argv = settings.to_argv()
    for name in ALL_HOOKS:
        flag = "--" + name.replace("_", "-")
        assert argv[argv.index(flag) + 1] == f"{site}:{name}"
    assert callref.resolve(f"{site}:pre_request").__name__ == "pre_request"


@pytest.mark.parametrize("value, allowed", [
    (lambda server: None, "top level of a module or of the settings file"),
    (print, "top level of a module or of the settings file"),
    (Settings.replace, "top level of a module or of the settings file"),
    (hook_apps.resp, "must accept 1 positional arguments"),
    ("hook_apps.record", "MODULE:NAME or FILE.py:NAME"),
], ids=["lambda", "builtin", "method", "two-arguments", "dotted"])
def test_what_the_workers_could_not_call_is_refused_with_one_line(value, allowed) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(on_exit=value)
    assert caught.value.name == "on_exit" and allowed in str(caught.value)
    assert "\n" not in str(caught.value)


CALLS: list[tuple] = []


def post_request_of_two(worker, req):
    CALLS.append((worker, req))


def test_post_request_may_take_two_arguments_as_in_gunicorn() -> None:
    assert hooks._load(Settings(), "post_request") is None
    hook = hooks._load(Settings(post_request=post_request_of_two), "post_request")
    hook("worker", "req", {"PATH_INFO": "/"}, "resp")
    assert CALLS == [("worker", "req")]


@pytest.mark.parametrize("reference, message", [
    ("no_such_module_here:hook", "cannot import 'no_such_module_here'"),
    ("hook_apps:nothing", "hook_apps has no function 'nothing'"),
    ("hook_apps:record", "must accept 2 positional arguments"),  # record(hook, **seen)
    ("/no/such/site.py:hook", "cannot run /no/such/site.py: FileNotFoundError"),
])
def test_a_reference_that_names_no_usable_function_fails_in_one_line(
        reference: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        hooks.WorkerHooks(Settings(worker_exit=reference))
    assert caught.value.name == "worker_exit" and message in str(caught.value), caught.value


class _Worker:
    """What WorkerHooks reads of a worker."""

    exchange_type = Exchange

    def __init__(self, settings: Settings) -> None:
        self.settings, self.served, self.signalled = settings, 0, ""


def test_without_request_hooks_the_worker_keeps_its_exchange(site: Path) -> None:
    worker = _Worker(Settings.from_file(site).replace(pre_request=None, post_request=None))
    hooks.WorkerHooks(worker.settings).install(worker)
    assert worker.exchange_type is Exchange
    worker = _Worker(Settings.from_file(site).replace(pre_request=None))
    hooks.WorkerHooks(worker.settings).install(worker)
    assert issubclass(worker.exchange_type, Exchange) and worker.exchange_type is not Exchange


# --------------------------------------------------------------------------
# On the real stack, under serve


def _ordered(records: list[dict]) -> list[str]:
    return [record["hook"] for record in records]


def test_every_hook_is_called_in_order_with_its_arguments(site: Path) -> None:
    record = site.parent / "record.jsonl"
    with scratch() as directory:
        served = start_serve(directory, "--settings", str(site), env=hook_env(record))
        try:
            wait_for(lambda: "when_ready" in _ordered(hook_apps.read(str(record))), 10, 0.05,
                     "when_ready")
            with HTTPClient("127.0.0.1", served.port) as client:
                reply = client.request("GET", "/?x=1", headers=[("X-Probe", "yes")])
            assert reply.status == 200
            endpoint = served.endpoint
        finally:
            assert served.stop() == 0
    records = hook_apps.read(str(record))
    names = _ordered(records)
    serve_pid = served.process.pid
    for name in ("on_starting", "when_ready", "post_worker_init", "worker_exit", "on_exit"):
        assert names.count(name) == 1, names
    assert names[0] == "on_starting" and names[-1] == "on_exit"
    assert names.index("post_worker_init") < names.index("when_ready")
    assert names[-2] == "worker_exit"
    requests = names[names.index("post_worker_init") + 1:-2]
    requests.remove("when_ready")
    assert requests == ["pre_request", "post_request"] * (len(requests) // 2), names

    by_name = {r["hook"]: r for r in records if r.get("uri", "/?x=1") == "/?x=1"}
    for name in ("on_starting", "when_ready", "on_exit"):
        assert by_name[name]["pid"] == by_name[name]["server_pid"] == serve_pid
        assert by_name[name]["app"] == APP and by_name[name]["workers"] == 1
    assert by_name["when_ready"]["endpoint"] == endpoint
    worker_pid = by_name["post_worker_init"]["pid"]
    assert worker_pid != serve_pid
    for name in WORKER_HOOKS:
        assert by_name[name]["pid"] == by_name[name]["worker_pid"] == worker_pid
        assert by_name[name]["worker_app"] == APP
    assert by_name["post_worker_init"]["nr"] == 0 and by_name["post_worker_init"]["alive"]
    pre, post = by_name["pre_request"], by_name["post_request"]
    for seen in (pre, post):
        assert (seen["method"], seen["path"], seen["query"], seen["version"]) == (
            "GET", "/", "x=1", [1, 1])
        assert ["X-PROBE", "yes"] in seen["headers"]
    assert (post["status"], post["status_code"], post["sent"]) == ("200 OK", 200,
                                                                   len(reply.body))
    assert post["path_info"] == "/" and ["Content-Type", "text/plain"] in post["resp_headers"]
    done = by_name["worker_exit"]
    assert done["server_pid"] == done["worker_ppid"] != serve_pid  # circusd
    assert done["nr"] == len(requests) // 2 and not done["alive"]


def test_a_raising_hook_is_logged_by_name_and_the_stack_goes_on(site: Path) -> None:
    record = site.parent / "record.jsonl"
    raising = [name for name in ALL_HOOKS if name != "on_starting"]
    with scratch() as directory:
        served = start_serve(directory, "--settings", str(site), "--workers", "2",
                             env=hook_env(record, raising))
        try:
            assert [served.get("/").status for _ in range(10)] == [200] * 10
            wait_for(lambda: "hook when_ready failed" in served.output(), 10, 0.05,
                     "when_ready's failure")
            assert served.stop() == 0
            output = served.output()
        finally:
            served.process.stop()
    for name in raising:
        assert f"hook {name} failed: RuntimeError: {name} broke" in output, name
    assert "Traceback (most recent call last)" in output
    called = set(_ordered(hook_apps.read(str(record))))
    assert called == set(ALL_HOOKS)


def test_on_starting_that_raises_stops_serve_with_one_line(site: Path) -> None:
    record = site.parent / "record.jsonl"
    with scratch() as directory:
        result = preflight(directory, "--settings", str(site), "--chdir", str(TESTS_DIR),
                           env=hook_env(record, ["on_starting"]))
    assert result.stderr == ("circus-wsgi: error: hook on_starting failed: RuntimeError: "
                             "on_starting broke\n")
    assert _ordered(hook_apps.read(str(record))) == ["on_starting"]  # and no on_exit


# --------------------------------------------------------------------------
# Files written by config, under plain circusd


@pytest.fixture
def under_circusd(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CircusStack]:
    monkeypatch.setenv("HOOK_RECORD", str(site.parent / "record.jsonl"))
    settings = Settings.from_file(site).replace(workers=2)
    with CircusStack(**settings.changed()) as stack:
        yield stack


def test_plain_circusd_runs_the_worker_hooks_of_config_files(
        under_circusd: CircusStack, site: Path) -> None:
    record = str(site.parent / "record.jsonl")
    with HTTPClient("127.0.0.1", under_circusd.port) as client:
        assert client.request("GET", "/").status == 200
    workers = set(under_circusd.pids("workers"))
    under_circusd.call("stop", name="workers", waiting=True)
    records = hook_apps.read(record)
    assert {r["pid"] for r in records if r["hook"] == "post_worker_init"} == workers
    assert {r["pid"] for r in records if r["hook"] == "worker_exit"} == workers
    assert _ordered(records).count("pre_request") == _ordered(records).count("post_request") == 1
    assert not {"on_starting", "when_ready", "on_exit"} & set(_ordered(records))  # serve's


def test_config_says_which_hooks_only_serve_runs(site: Path) -> None:
    result = subprocess.run([CIRCUS_WSGI, "config", "--settings", str(site), "--out",
                             str(site.parent / "out")], capture_output=True, text=True,
                            env={**python_env(), **hook_env(site.parent / "r.jsonl")},
                            timeout=60, cwd=str(TESTS_DIR))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("circus-wsgi: warning: on_starting, when_ready and on_exit run "
                             "only under circus-wsgi serve, not under circusd\n")


def test_serve_help_lists_the_hook_and_reload_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "circus_wsgi", "serve", "--help"],
                            capture_output=True, text=True, timeout=60, cwd=str(PROJECT_DIR))
    for name in ALL_HOOKS:
        assert f"--{name.replace('_', '-')} MODULE:NAME" in result.stdout, name
    assert "--reload " in result.stdout and "--reload-extra-file PATH" in result.stdout
    assert "server hooks settings:" in result.stdout and "development settings:" in result.stdout
