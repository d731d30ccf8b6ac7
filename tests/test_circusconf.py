"""Settings -> circus.ini, read back with circus's own loader (circus.config.get_config).

The workers' and dispatcher's command lines are split the way circus splits them
(shlex) and parsed with circus-wsgi's own parser: they must rebuild the Settings.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from circus.config import get_config

from circus_wsgi import cli
from circus_wsgi.circusconf import (
    CHECK_DELAY, FLAPPING_PLUGIN, MONGREL2_GRACEFUL_TIMEOUT, STOP_MARGIN, circus_ini)
from circus_wsgi.memory import glibc_tunables
from circus_wsgi.mongrel2_binary import locate
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import Settings, SettingsError

HERE = Path(__file__).resolve().parent
#: Characters circus's ini parser and shlex both care about.
AWKWARD_FORMAT = "%(h)s ;%(r)s; 'q' \"d\" \\ $x $(y) #z %%"


def resolved(tmp: Path, **values: object) -> Settings:
    values.setdefault("app", "examples.hello:app")
    return Settings(**values).with_defaults_resolved(str(tmp / "run"))


def load(tmp: Path, settings: Settings) -> dict:
    """circus's view of the circus.ini written for ``settings``."""
    path = tmp / "circus.ini"
    path.write_text(circus_ini(settings, tmp / "config.sqlite"))
    return get_config(str(path))


def watchers(config: dict) -> dict[str, dict]:
    return {watcher["name"]: watcher for watcher in config["watchers"]}


def settings_from_cmd(cmd: str, command: str) -> Settings:
    argv = shlex.split(cmd)
    assert argv[:4] == [sys.executable, "-m", "circus_wsgi", command]
    return cli.settings_from_args(cli.build_parser().parse_args([command, *argv[4:]]))


@pytest.fixture
def settings(run_dir: Path) -> Settings:
    return resolved(run_dir, workers=3, graceful_timeout=4, chdir=str(HERE),
                    env={"GREETING": "hello world", "EMPTY": "", "SEMI": "a;b", "Q": "it's"},
                    access_log_format=AWKWARD_FORMAT, mounts=["/api=pkg.api:app"])


def test_circusd_endpoints_are_ipc_sockets_in_the_run_dir(run_dir: Path,
                                                          settings: Settings) -> None:
    config = load(run_dir, settings)
    run = RunDir(Path(settings.run_dir))
    assert (config["endpoint"], config["pubsub_endpoint"]) == (
        run.circus_endpoint, run.circus_pubsub)
    # circus's loader turns statsd on when [circus] names a stats_endpoint: it names none,
    # and circusd-stats runs as a watcher of its own, publishing on the run dir's socket
    assert config["statsd"] is False
    stats = watchers(config)["circusd-stats"]
    assert "circus_wsgi.lifeline" in stats["cmd"] and run.circus_stats in stats["cmd"]
    assert config["multicast_endpoint"] == ""
    assert config["check_delay"] == CHECK_DELAY
    assert "tcp://" not in (run_dir / "circus.ini").read_text()


def test_a_tcp_endpoint_is_used_only_when_asked_for(run_dir: Path) -> None:
    config = load(run_dir, resolved(run_dir, endpoint="tcp://127.0.0.1:6555"))
    assert config["endpoint"] == "tcp://127.0.0.1:6555"
    assert config["pubsub_endpoint"].startswith("ipc://")


def test_watchers_and_plugin(run_dir: Path, settings: Settings) -> None:
    config = load(run_dir, settings)
    assert set(watchers(config)) == {"circusd-stats", "mongrel2", "dispatcher", "workers"}
    [plugin] = config["plugins"]
    argv = shlex.split(plugin.pop("cmd"))
    assert argv[:3] == [sys.executable, "-c", "from circus import plugins;plugins.main()"]
    assert argv[-3:] == ["--log-level", "warning", FLAPPING_PLUGIN]
    assert plugin == {"__name__": "plugin:flapping", "name": "plugin:flapping",
                      "use": FLAPPING_PLUGIN, "attempts": "3", "window": "5",
                      "retry_in": "5", "retries": "2", "run_dir": settings.run_dir}
    assert load(run_dir, settings.replace(
        flapping_attempts=7, flapping_window=0.5, flapping_retry_in=1.25,
        flapping_max_retry=0))["plugins"][0] | {"__name__": "", "cmd": ""} == {
        "__name__": "", "name": "plugin:flapping", "use": FLAPPING_PLUGIN, "attempts": "7",
        "window": "0.5", "retry_in": "1.25", "retries": "0", "run_dir": settings.run_dir,
        "cmd": ""}


def test_mongrel2_watcher(run_dir: Path, settings: Settings) -> None:
    mongrel2 = watchers(load(run_dir, settings))["mongrel2"]
    assert shlex.split(mongrel2["cmd"]) == [
        sys.executable, "-m", "circus_wsgi.lifeline", locate("").path,
        str(run_dir / "config.sqlite"), settings.server_uuid]
    assert mongrel2["working_dir"] == "/"
    assert mongrel2["singleton"] is True and mongrel2["numprocesses"] == 1
    assert mongrel2["graceful_timeout"] == MONGREL2_GRACEFUL_TIMEOUT
    assert mongrel2["stdout_stream"] == mongrel2["stderr_stream"] == {
        "class": "circus_wsgi.logstream.Mongrel2Stream", "prefix": "mongrel2", "level": "info"}


@pytest.mark.parametrize("level, circus_level", [
    ("debug", "info"), ("info", "warning"), ("warning", "warning"), ("error", "error")])
def test_circus_itself_logs_one_step_quieter_than_the_stack(run_dir: Path, level: str,
                                                            circus_level: str) -> None:
    config = load(run_dir, resolved(run_dir, log_level=level))
    assert config["loglevel"] == circus_level
    stats = shlex.split(watchers(config)["circusd-stats"]["cmd"])
    assert stats[stats.index("--log-level") + 1] == circus_level
    plugin = shlex.split(config["plugins"][0]["cmd"])
    assert plugin[plugin.index("--log-level") + 1] == circus_level
    mongrel2 = watchers(config)["mongrel2"]
    assert mongrel2["stdout_stream"]["level"] == mongrel2["stderr_stream"]["level"] == level


def test_a_user_runs_everything_but_circusd(run_dir: Path) -> None:
    config = load(run_dir, resolved(run_dir, user="nobody", bind="127.0.0.1:80"))
    found = watchers(config)
    for name in ("circusd-stats", "dispatcher", "workers"):
        assert (found[name]["uid"], found[name]["gid"]) == ("nobody", "nogroup"), name
    assert (config["plugins"][0]["uid"], config["plugins"][0]["gid"]) == ("nobody", "nogroup")
    assert found["circusd-stats"]["hooks"] == {
        "before_start": ["circus_wsgi.privileges.own_circus_sockets", False]}
    assert found["mongrel2"]["uid"] is None  # root's, until setpriv switches
    assert shlex.split(found["mongrel2"]["cmd"])[:7] == [
        sys.executable, "-m", "circus_wsgi.privileges", "65534", "65534", "--bind-service",
        "--"]
    high = watchers(load(run_dir, resolved(run_dir, user="nobody", bind="127.0.0.1:8080")))
    assert "--bind-service" not in high["mongrel2"]["cmd"]


def test_a_mongrel2_in_a_prefix_runs_with_the_prefix_libraries(
        run_dir: Path, settings: Settings, tmp_path: Path) -> None:
    binary = tmp_path / "m2" / "usr" / "bin" / "mongrel2"
    libraries = tmp_path / "m2" / "usr" / "lib" / "x86_64-linux-gnu"
    for path in (binary, libraries / "libmbedtls.so.14"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o755)
    found = watchers(load(run_dir, settings.replace(mongrel2=str(binary))))
    assert shlex.split(found["mongrel2"]["cmd"])[3] == str(binary)
    assert found["mongrel2"]["env"]["LD_LIBRARY_PATH"] == str(libraries)
    assert "LD_LIBRARY_PATH" not in found["workers"]["env"]
    (libraries / "libmbedtls.so.14").unlink()  # a prefix without libraries: none added
    assert "LD_LIBRARY_PATH" not in watchers(load(
        run_dir, settings.replace(mongrel2=str(binary))))["mongrel2"]["env"]


def test_only_mongrel2_gets_the_malloc_tuning(run_dir: Path, settings: Settings,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    found = watchers(load(run_dir, settings))
    assert found["mongrel2"]["env"]["GLIBC_TUNABLES"] == glibc_tunables()
    assert "GLIBC_TUNABLES" not in found["workers"]["env"]
    assert "GLIBC_TUNABLES" not in found["dispatcher"]["env"]


def test_a_glibc_tunables_of_the_users_is_left_to_mongrel2(
        run_dir: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert "GLIBC_TUNABLES" not in circus_ini(settings, run_dir / "config.sqlite")
    mongrel2 = watchers(load(run_dir, settings))["mongrel2"]
    assert mongrel2["env"]["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_workers_watcher(run_dir: Path, settings: Settings) -> None:
    workers = watchers(load(run_dir, settings))["workers"]
    assert settings_from_cmd(workers["cmd"], "worker") == settings
    assert workers["numprocesses"] == 3 and workers["singleton"] is False
    assert workers["working_dir"] == str(HERE)
    assert workers["graceful_timeout"] == 4 + STOP_MARGIN
    assert workers["copy_env"] is True and "virtualenv" not in workers
    assert {key: workers["env"][key] for key, _ in settings.env} == dict(settings.env)
    assert workers["stdout_stream"] == workers["stderr_stream"] == {
        "class": "circus_wsgi.logstream.PrefixedStream", "prefix": "workers"}


def test_dispatcher_watcher(run_dir: Path, settings: Settings) -> None:
    dispatcher = watchers(load(run_dir, settings))["dispatcher"]
    assert settings_from_cmd(dispatcher["cmd"], "dispatcher") == settings
    assert dispatcher["singleton"] is True
    assert dispatcher["stderr_stream"]["prefix"] == "dispatcher"
    assert "GREETING" not in dispatcher["env"]


@pytest.mark.parametrize("name", ["console", "metrics"])
def test_the_console_and_metrics_watchers_read_their_token_from_a_file(
        run_dir: Path, name: str) -> None:
    run = RunDir(run_dir / "run")
    token_file = {"console": run.console_token, "metrics": run.metrics_token}[name]
    for token, given in (("", None), ("s3cret", f"@{token_file}"), ("@/etc/t", "@/etc/t")):
        settings = resolved(run_dir, **{name: "127.0.0.1:9300", f"{name}_token": token},
                            log_level="debug")
        found = watchers(load(run_dir, settings))
        assert set(found) == {"circusd-stats", "mongrel2", "dispatcher", "workers", name}
        watcher = found[name]
        assert "s3cret" not in watcher["cmd"]
        assert settings_from_cmd(watcher["cmd"], name) == Settings(
            run_dir=settings.run_dir, log_level="debug", **{name: "127.0.0.1:9300"},
            **({f"{name}_token": given} if given else {}))
        assert watcher["singleton"] is True and watcher["stderr_stream"]["prefix"] == name


def test_a_semicolon_after_a_space_survives_circus_comment_rule(run_dir: Path) -> None:
    # circus ends a value at the first ";" that follows a space
    settings = resolved(run_dir, access_log_format="%(h)s ;%(r)s")
    workers = watchers(load(run_dir, settings))["workers"]
    assert settings_from_cmd(workers["cmd"], "worker") == settings


def test_direct_mode_has_no_dispatcher(run_dir: Path) -> None:
    config = load(run_dir, resolved(run_dir, mode="direct", flow_control=False))
    assert set(watchers(config)) == {"circusd-stats", "mongrel2", "workers"}


def test_no_workers_env_section_without_env(run_dir: Path) -> None:
    assert "[env:workers]" not in circus_ini(resolved(run_dir), run_dir / "config.sqlite")


def test_a_name_given_twice_in_env_keeps_the_last_value(run_dir: Path) -> None:
    config = load(run_dir, resolved(run_dir, env=["A=1", "A=2"]))
    assert watchers(config)["workers"]["env"]["A"] == "2"


def test_virtualenv(run_dir: Path) -> None:
    venv = run_dir / "venv"
    (venv / "lib" / ("python%d.%d" % sys.version_info[:2]) / "site-packages").mkdir(
        parents=True)
    workers = watchers(load(run_dir, resolved(run_dir, virtualenv=str(venv))))["workers"]
    assert workers["virtualenv"] == str(venv) and workers["copy_env"] is True


@pytest.mark.parametrize("values,name,reason", [
    ({"virtualenv": "/"}, "virtualenv", "must be a virtualenv for Python"),
    ({"env": {"A": "x ;y"}}, "env", "' ;' starts a comment"),
    ({"env": {"A": "$HOME"}}, "env", "circus would replace $NAME"),
    ({"env": {"A": " padded"}}, "env", "circus strips spaces"),
    ({"env": {"A": '""'}}, "env", "circus strips spaces"),
    ({"env": {"A": "two\nlines"}}, "env", "a line break"),
    ({"access_log_format": "%(h)s\n%(r)s"}, "access_log_format", "a line break"),
    ({"access_log": "/var/log/$(circus.wid).log"}, "access_log", "$(circus.*)"),
    ({"access_log": "((circus.env.home))"}, "access_log", "$(circus.*)"),
    ({"app": None}, "app", "required"),
])
def test_values_circus_would_change_are_refused(run_dir: Path, values: dict, name: str,
                                                reason: str) -> None:
    with pytest.raises(SettingsError) as caught:
        circus_ini(resolved(run_dir, **values), run_dir / "config.sqlite")
    assert caught.value.name == name and reason in str(caught.value)


def test_unresolved_settings_are_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="with_defaults_resolved"):
        circus_ini(Settings(app="a:b"), run_dir / "config.sqlite")


def test_the_file_says_it_was_generated(run_dir: Path, settings: Settings) -> None:
    text = circus_ini(settings, run_dir / "config.sqlite")
    assert text.startswith("# circus.ini written by circus-wsgi from its Settings.")


def test_reload_adds_the_reloader_watcher(run_dir: Path, settings: Settings) -> None:
    assert "reloader" not in watchers(load(run_dir, settings))
    reloading = settings.replace(reload=True, reload_extra_files=[str(HERE / "serve_apps.py")])
    reloader = watchers(load(run_dir, reloading))["reloader"]
    assert settings_from_cmd(reloader["cmd"], "reloader") == reloading
    assert reloader["singleton"] is True and reloader["working_dir"] == str(HERE)
    assert reloader["stderr_stream"]["prefix"] == "reloader"


def test_a_hook_reaches_the_workers_by_its_reference(run_dir: Path) -> None:
    settings = resolved(run_dir, post_request=f"{run_dir}/odd ;dir/site.py:post_request",
                        post_worker_init="site_hooks:post_worker_init")
    workers = watchers(load(run_dir, settings))["workers"]
    assert settings_from_cmd(workers["cmd"], "worker") == settings
