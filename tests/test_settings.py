"""Settings: every converter and validation rule, the CLI round trip, settings files,
and the command line's one-line error with exit status 2 for each kind of bad value."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from circus_wsgi import cli
from circus_wsgi.rundir import IPC_PATH_MAX, RUN_DIR_MAX, SOCKETS, RunDir
from circus_wsgi.settings import SETTINGS, Settings, SettingsError

HERE = Path(__file__).resolve().parent
STATIC = str(HERE.parent / "examples" / "static")


def error_of(**values: object) -> SettingsError:
    with pytest.raises(SettingsError) as caught:
        Settings(**values)
    return caught.value


def from_cli(argv: list[str]) -> Settings:
    return cli.settings_from_args(cli.build_parser().parse_args(["config", "--out", "x", *argv]))


# -- the declarations


def test_every_setting_is_declared_once_with_help_flag_and_kind() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for setting in SETTINGS:
        assert setting.help and setting.kind, setting.name
        # the name's, unless gunicorn spells it otherwise (--reload-extra-file)
        assert setting.flag == (setting.cli or "--" + setting.name.replace("_", "-"))


def test_defaults_are_valid_values() -> None:
    settings = Settings()
    for setting in SETTINGS:
        if setting.default not in (None, "", ".", ()):  # unset, or resolved where used
            assert setting.convert(setting.default) == setting.default, setting.name
    assert settings.changed() == {}


# -- one converter at a time: (setting, value given, value kept)

VALID = [
    ("workers", "3", 3), ("workers", 4, 4), ("workers", 2.0, 2), ("max_requests", "0", 0),
    ("graceful_timeout", "2.5", 2.5), ("graceful_timeout", 0, 0.0),
    ("flow_control", "yes", True), ("flow_control", "Off", False), ("flow_control", True, True),
    ("flow_control", "1", True), ("flow_control", "false", False),
    ("access_log", "", ""), ("access_log", "/var/log/a.log", "/var/log/a.log"),
    ("app", "pkg.mod:app", "pkg.mod:app"), ("app", "mod:make_app()", "mod:make_app()"),
    ("bind", "0.0.0.0:80", "0.0.0.0:80"), ("bind", "localhost:8080", "localhost:8080"),
    ("bind", "[::1]:8000", "::1:8000"), ("bind", "127.0.0.1:08000", "127.0.0.1:8000"),
    ("run_dir", "", ""), ("run_dir", "rel", os.path.abspath("rel")),
    ("chdir", str(HERE), str(HERE)), ("chdir", ".", os.path.abspath(".")),
    ("endpoint", "", ""), ("endpoint", "ipc:///tmp/c.sock", "ipc:///tmp/c.sock"),
    ("endpoint", "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5555"),
    ("server_uuid", "F400BF85-4538-4F7A-8908-67E313D515C2",
     "f400bf85-4538-4f7a-8908-67e313d515c2"),
    ("mode", "direct", "direct"), ("log_level", "debug", "debug"),
    ("env", {"A": "1", "B_2": "x=y"}, (("A", "1"), ("B_2", "x=y"))),
    ("env", ["A=1", ("B", 2)], (("A", "1"), ("B", "2"))),
    ("env", "A=", (("A", ""),)),
    ("mounts", ["/api=pkg:api"], (("/api", "pkg:api"),)),
    ("static", {"/s": STATIC}, (("/s", STATIC),)),
    ("static", [("/s/", "examples/static")], (("/s/", os.path.abspath("examples/static")),)),
    ("reload", "yes", True), ("reload", False, False),
    ("pre_request", "pkg.hooks:pre", "pkg.hooks:pre"),
    ("on_exit", "/srv/site/settings.py:on_exit", "/srv/site/settings.py:on_exit"),
    ("post_worker_init", None, None),
    ("console", "8001", "127.0.0.1:8001"), ("console", "0.0.0.0:8001", "0.0.0.0:8001"),
    ("console", "", ""), ("console_token", " abc ", "abc"), ("console_token", "@/t", "@/t"),
]


@pytest.mark.parametrize("name,given,kept", VALID)
def test_valid_value_is_converted(name: str, given: object, kept: object,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(HERE.parent)
    assert getattr(Settings(**{name: given}), name) == kept


INVALID = [
    ("workers", "0", "integer >= 1"), ("workers", "two", "integer >= 1"),
    ("workers", True, "integer >= 1"), ("workers", 2.5, "integer >= 1"),
    ("workers", None, "integer >= 1"), ("threads", "1.5", "integer >= 1"),
    ("content_length", 1000, "integer >= 1024"), ("buffer_size", 4095, "integer >= 4096"),
    ("graceful_timeout", "-1", "seconds >= 0"), ("graceful_timeout", "nan", "seconds >= 0"),
    ("graceful_timeout", "inf", "seconds >= 0"), ("graceful_timeout", False, "seconds >= 0"),
    ("timeout", 0.5, "seconds >= 1"), ("flapping_window", "x", "seconds >= 0.1"),
    ("flow_control", "maybe", "true or false"), ("flow_control", 2, "true or false"),
    ("access_log", 5, "must be a string"),
    ("app", "app", "MODULE:CALLABLE"), ("app", "a:b:c", "MODULE:CALLABLE"),
    ("app", "1mod:app", "MODULE:CALLABLE"), ("app", "mod:app()x", "MODULE:CALLABLE"),
    ("bind", "8000", "HOST:PORT"), ("bind", "127.0.0.1:0", "port from 1 to 65535"),
    ("bind", "127.0.0.1:65536", "port from 1 to 65535"), ("bind", ":80", "IP address"),
    ("bind", "example.com:80", "IP address or localhost"), ("bind", 80, "HOST:PORT"),
    ("run_dir", 5, "must be a path"), ("virtualenv", None, "must be a path"),
    ("chdir", "/no/such/dir", "does not exist"), ("chdir", "", "does not exist"),
    ("endpoint", "http://x", "ipc://PATH or tcp://HOST:PORT"),
    ("endpoint", "tcp://host", "ipc://PATH or tcp://HOST:PORT"),
    ("endpoint", "tcp://host:0", "port must be from 1 to 65535"),
    ("endpoint", "ipc:///" + "x" * IPC_PATH_MAX, f"at most {IPC_PATH_MAX} bytes"),
    ("send_spec", "tcp://h:70000", "port must be from 1 to 65535"),
    ("server_uuid", "not-a-uuid", "UUID"), ("mode", "fast", "dispatcher, direct"),
    ("log_level", "DEBUG", "one of debug, info"),
    ("env", 5, "NAME=VALUE"), ("env", ["A"], "NAME=VALUE"), ("env", ["1A=x"], "variable name"),
    ("env", [("A", "1", "2")], "NAME=VALUE"), ("env", ["A-B=1"], "variable name"),
    ("mounts", None, "PREFIX=APP"), ("mounts", ["api=pkg:api"], "start with /"),
    ("mounts", ["/api=nope"], "MODULE:CALLABLE"), ("mounts", ["/a(b)=m:a"], "no space, = or ("),
    ("mounts", [("/a=b", "m:a")], "no space, = or ("), ("mounts", ["/a b=m:a"], "no space"),
    ("static", ["/s=/no/such/dir"], "does not exist"), ("static", ["/s"], "PREFIX=DIR"),
    ("static", {"s": STATIC}, "start with /"),
    ("reload", "sometimes", "true or false"),
    ("reload_extra_files", ["/no/such/file"], "does not exist"),
    ("reload_extra_files", 5, "list of paths"),
    ("pre_request", "hooks.pre", "MODULE:NAME or FILE.py:NAME"),
    ("on_starting", 5, "must be a function"),
    ("console", "0", "port from 1 to 65535"), ("console", "example.com:80", "IP address"),
    ("console_token", "a b", "without spaces"),
]


@pytest.mark.parametrize("name,given,allowed", INVALID)
def test_invalid_value_names_setting_value_and_what_is_allowed(
        name: str, given: object, allowed: str) -> None:
    error = error_of(**{name: given})
    assert (error.name, error.value) == (name, given)
    assert allowed in error.allowed
    assert str(error).startswith(f"setting {name!r}: invalid value {given!r}: ")
    assert "\n" not in str(error)


def test_unknown_setting_is_refused() -> None:
    error = error_of(wokers=2)
    assert error.name == "wokers" and "no such setting" in str(error)


# -- rules that involve several settings


def test_direct_mode_alone_is_valid() -> None:
    assert Settings(mode="direct").mode == "direct"


@pytest.mark.parametrize("values,name", [
    ({"mounts": ["/=pkg:other"]}, "mounts"),
    ({"mounts": ["/api=a:b", "/api/=a:c"]}, "mounts"),
    ({"mounts": ["/api=a:b"], "static": [f"/api/={STATIC}"]}, "static"),
    ({"static": [f"/s={STATIC}", f"/s={STATIC}"]}, "static"),
])
def test_each_url_prefix_has_one_route(values: dict, name: str) -> None:
    assert error_of(**values).name == name


def test_run_dir_too_long_for_ipc_sockets() -> None:
    """The limit the message gives is the one enforced: every socket path fits."""
    longest = "/tmp/" + "r" * (RUN_DIR_MAX - 5)
    error = error_of(run_dir=longest + "r")
    assert error.name == "run_dir" and "too long for ipc sockets" in error.allowed
    assert f"at most {RUN_DIR_MAX} bytes" in error.allowed
    run = RunDir(Path(Settings(run_dir=longest).run_dir))
    for name in SOCKETS:
        assert len(str(run.path / name).encode()) <= IPC_PATH_MAX
    assert len(run.dispatcher_status[len("ipc://"):].encode()) == IPC_PATH_MAX


def test_every_socket_of_the_run_dir_is_counted_in_its_length_limit() -> None:
    run = RunDir(Path("/r"))
    paths = [getattr(run, name) for name in dir(RunDir) if not name.startswith("_")
             and isinstance(getattr(RunDir, name), property)]
    sockets = {str(p).rpartition("/")[2] for p in paths if str(p).endswith(".sock")}
    assert sockets == set(SOCKETS)


# -- the object


def test_settings_are_immutable_and_compare_by_value() -> None:
    settings = Settings(workers=3)
    with pytest.raises(AttributeError):
        settings.workers = 4  # type: ignore[misc]
    with pytest.raises(AttributeError, match="no setting 'nope'"):
        settings.nope  # noqa: B018
    assert settings == Settings(workers="3") != Settings()
    assert repr(settings) == "Settings(workers=3)"
    assert dict(settings)["workers"] == 3


def test_replace_checks_again_and_changed_lists_non_defaults() -> None:
    settings = Settings(app="a:b", workers=3)
    assert settings.replace(workers=5).changed() == {"app": "a:b", "workers": 5}
    assert settings.changed() == {"app": "a:b", "workers": 3}
    with pytest.raises(SettingsError):
        settings.replace(workers=0)
    assert settings.replace(workers=2).changed() == {"app": "a:b"}


def test_with_defaults_resolved_fills_run_dir_and_a_stable_uuid() -> None:
    resolved = Settings(app="a:b").with_defaults_resolved("/tmp/x")
    assert resolved.run_dir == "/tmp/x"
    assert uuid.UUID(resolved.server_uuid)
    assert resolved == Settings(app="a:b").with_defaults_resolved("/tmp/x")
    assert resolved.server_uuid != Settings(bind="127.0.0.1:9").with_defaults_resolved(
        "/tmp/x").server_uuid
    given = Settings(run_dir="/tmp/y", server_uuid=resolved.server_uuid)
    assert given.with_defaults_resolved("/tmp/x") == given


# -- to_argv and the command line

#: A value different from the default for every setting: the round trip covers them all.
EVERY_SETTING = {
    "app": "examples.hello:app", "mounts": ["/api=pkg.api:app", "/b=m:f()"],
    "chdir": str(HERE), "env": {"A": "1", "B": "x=y z"}, "virtualenv": "/opt/venv",
    "bind": "0.0.0.0:8080", "static": {"/static": STATIC},
    "server_uuid": "f400bf85-4538-4f7a-8908-67e313d515c2", "run_dir": "/tmp/cw-run",
    "mongrel2": "/opt/mongrel2/bin/mongrel2", "endpoint": "tcp://127.0.0.1:6555",
    "workers": 5, "threads": 4, "mode": "direct",
    "send_spec": "tcp://10.0.0.1:9997", "recv_spec": "ipc:///tmp/r.sock",
    "graceful_timeout": 1.5, "timeout": 7, "max_requests": 100, "max_requests_jitter": 10,
    "max_worker_memory": 512,
    "prefetch": 3,
    "queue_timeout": 0.5, "max_queue": 7, "max_body_size": 0, "content_length": 4096,
    "buffer_size": 8192, "min_ping": 0, "flow_control": False, "access_log": "-x.log",
    "access_log_format": "-%(h)s \"%(r)s\" 'q'", "log_level": "debug",
    "flapping_attempts": 5, "flapping_window": 2.5, "flapping_retry_in": 0,
    "flapping_max_retry": 0,
    "certfile": "/etc/ssl/site.pem", "keyfile": "/etc/ssl/site.key",
    "ciphers": "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256", "user": "nobody", "group": "nogroup",
    "forwarded_allow_ips": "10.0.0.0/8,*", "http_redirect": "0.0.0.0:80",
    "on_starting": "site_hooks:on_starting", "when_ready": "/srv/site.py:when_ready",
    "post_worker_init": "site_hooks:post_worker_init", "pre_request": "site_hooks:pre",
    "post_request": "site_hooks:post", "worker_exit": "site_hooks:worker_exit",
    "on_exit": "/srv/a dir/site.py:on_exit",
}
#: reload refuses direct mode: the reload settings round-trip with the dispatcher's.
WITH_RELOAD = {"mode": "dispatcher", "reload": True,
               "reload_extra_files": [STATIC, str(HERE / "serve_apps.py")]}


#: The settings that cannot go with EVERY_SETTING's (autoscaling needs the dispatcher),
#: and the secret ones, which a command line never carries.
ALSO = {"workers_min": 2, "workers_max": 6, "scale_down_idle": 5.5,
        "metrics": "0.0.0.0:9100", "metrics_token": "s3cret",
        "console": "[::1]:9200", "console_token": "@/run/s3cret"}
SECRETS = {"metrics_token", "console_token"}
#: A front taking remote workers, and a host of workers alone for it.
REMOTE_FRONT = {"remote_workers": "tcp://0.0.0.0:7700", "insecure_remote_workers": True,
                "remote_timeout": 1.5}
REMOTE_HOST = {"role": "workers", "connect": "tcp://10.0.0.1:7700", "curve_keys": str(HERE)}


@pytest.mark.parametrize("values", [EVERY_SETTING, {**EVERY_SETTING, **WITH_RELOAD}, ALSO,
                                    REMOTE_FRONT, REMOTE_HOST],
                         ids=["direct", "reload", "autoscaling", "front", "worker-host"])
def test_every_setting_round_trips_through_the_command_line(values: dict) -> None:
    assert set(EVERY_SETTING) | set(WITH_RELOAD) | set(ALSO) | set(REMOTE_FRONT) | \
        set(REMOTE_HOST) == {s.name for s in SETTINGS}
    settings = Settings(**values)
    defaults = {name for name, value in values.items() if value == "dispatcher"}  # mode
    assert set(settings.changed()) == set(values) - defaults
    argv = settings.to_argv()
    assert not [word for word in argv if "s3cret" in word]  # secrets never on one
    public = {k: v for k, v in values.items() if k not in SECRETS}
    secrets = [f"--{name.replace('_', '-')}={values[name]}" for name in SECRETS & set(values)]
    assert from_cli(argv + secrets) == Settings(**public, **{k: values[k] for k in
                                                              SECRETS & set(values)})


def test_to_argv_leaves_defaults_out_and_can_pick_names() -> None:
    settings = Settings(app="a:b", workers=3, env={"A": "1", "B": "2"})
    assert settings.to_argv() == ["a:b", "--env", "A=1", "--env", "B=2", "--workers", "3"]
    assert settings.to_argv(["workers"]) == ["--workers", "3"]
    assert Settings().to_argv() == []


def test_a_value_starting_with_a_dash_is_joined_to_its_flag() -> None:
    argv = Settings(access_log="-weird").to_argv()
    assert argv == ["--access-log=-weird"]
    assert from_cli(argv).access_log == "-weird"


def test_flags_override_a_settings_file(run_dir: Path) -> None:
    path = run_dir / "site.py"
    path.write_text("from circus_wsgi import Settings\n"
                    "settings = Settings(app='a:b', workers=3, threads=2)\n")
    assert from_cli(["--settings", str(path), "--workers", "7"]) == Settings(
        app="a:b", workers=7, threads=2)


# -- settings files


@pytest.mark.parametrize("text,name,allowed", [
    (None, "settings", "file not found"),
    ("x = 1\n", "settings", "must assign settings = Settings(...)"),
    ("settings = {'workers': 2}\n", "settings", "must assign settings = Settings(...)"),
    ("settings = (\n", "settings", "the file fails: SyntaxError"),
    ("import no_such_module_here\n", "settings", "the file fails: ModuleNotFoundError"),
    ("from circus_wsgi import Settings\nsettings = Settings(workers=0)\n", "workers",
     "integer >= 1"),
])
def test_bad_settings_file(run_dir: Path, text: str | None, name: str, allowed: str) -> None:
    path = run_dir / "site.py"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        Settings.from_file(path)
    assert caught.value.name == name and allowed in caught.value.allowed
    assert "\n" not in str(caught.value)


def test_settings_file_may_compute_values(run_dir: Path) -> None:
    path = run_dir / "site.py"
    path.write_text("import os\nfrom circus_wsgi import Settings\n"
                    "settings = Settings(app='a:b', workers=int(os.environ.get('CW_N', 4)))\n")
    assert Settings.from_file(str(path)) == Settings(app="a:b", workers=4)


# -- the real command: one line on stderr naming the setting, exit status 2

BAD_FILE = "from circus_wsgi import Settings\nsettings = Settings(threads='many')\n"
APP = "examples.hello:app"
CLI_ERRORS = {  # kind of bad value: (arguments, setting named)
    "integer": ([APP, "--workers", "0"], "workers"),
    "seconds": ([APP, "--graceful-timeout", "soon"], "graceful_timeout"),
    "boolean": ([APP, "--flow-control", "maybe"], "flow_control"),
    "choice": ([APP, "--mode", "fast"], "mode"),
    "app": (["not-an-app"], "app"),
    "bind": ([APP, "--bind", "example.com:80"], "bind"),
    "endpoint": ([APP, "--endpoint", "http://x"], "endpoint"),
    "uuid": ([APP, "--server-uuid", "123"], "server_uuid"),
    "pair": ([APP, "--env", "NOEQUALS"], "env"),
    "pair key": ([APP, "--static", "static=/tmp"], "static"),
    "missing directory": ([APP, "--static", "/s=/no/such/dir"], "static"),
    "chdir": ([APP, "--chdir", "/no/such/dir"], "chdir"),
    "prefix twice": ([APP, "--mounts", "/=a:b"], "mounts"),
    "run_dir too long": ([APP, "--run-dir", "/tmp/" + "r" * 100], "run_dir"),
    "missing settings file": (["--settings", "/no/such/site.py"], "settings"),
    "bad value in settings file": (["--settings", "{bad_file}"], "threads"),
    "circus.ini cannot hold it": ([APP, "--env", "A=$HOME"], "env"),
    "no app": ([], "app"),
    "reload in direct mode": ([APP, "--reload", "--mode", "direct"], "reload"),
    "extra file without reload": ([APP, "--reload-extra-file", "/tmp"], "reload_extra_files"),
    "missing extra file": ([APP, "--reload", "--reload-extra-file", "/no/such"],
                           "reload_extra_files"),
    "hook": ([APP, "--pre-request", "hooks.pre_request"], "pre_request"),
}


@pytest.fixture(scope="module")
def cli_errors() -> Iterator[dict[str, tuple[str, str, int, bool]]]:
    """Run every bad command at once (they are independent).

    kind -> (stdout, stderr, exit status, whether the --out directory was made).
    """
    with tempfile.TemporaryDirectory(prefix="cw-test-", dir="/tmp") as name:
        tmp = Path(name)
        bad_file = tmp / "bad.py"
        bad_file.write_text(BAD_FILE)
        procs = {}
        for kind, (args, _) in CLI_ERRORS.items():
            out = tmp / kind.replace(" ", "-")
            argv = [arg.format(bad_file=bad_file) for arg in args] + ["--out", str(out)]
            procs[kind] = (out, subprocess.Popen(
                [sys.executable, "-m", "circus_wsgi", "config", *argv],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent))
        results = {}
        for kind, (out, proc) in procs.items():
            stdout, stderr = proc.communicate(timeout=60)
            results[kind] = (stdout, stderr, proc.returncode, out.exists())
        yield results


@pytest.mark.parametrize("kind", CLI_ERRORS)
def test_cli_bad_value_prints_one_line_and_exits_2(cli_errors: dict, kind: str) -> None:
    stdout, stderr, status, wrote = cli_errors[kind]
    setting = CLI_ERRORS[kind][1]
    assert status == 2, stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    assert stderr.startswith(f"circus-wsgi: error: setting {setting!r}: invalid value "), stderr
    assert stdout == "" and not wrote
