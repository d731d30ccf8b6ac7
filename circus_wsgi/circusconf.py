"""Settings -> ``circus.ini``: how circusd runs and controls the whole stack.

This module owns the circus side of a deployment: circusd's own endpoints (ipc
sockets in the run dir; TCP only when the user set a tcp:// endpoint), circusd-stats
for circus-top, multicast discovery turned off, the watchers ``mongrel2``,
``dispatcher`` (not in direct mode), ``workers`` and ``reloader`` (with reload), the
environment of the workers and of mongrel2 (glibc malloc tuning, :mod:`.memory`; the
library path of a mongrel2 in a prefix of its own, :mod:`.mongrel2_binary`), the
flapping and autoscaling plugins, the metrics endpoint and the console, the user every process but
circusd runs as (:mod:`.privileges`), and the plain-HTTP port that redirects to HTTPS
(:mod:`.redirect`).

circus reads the file with its own parser, which differs from Python's
configparser: values are stripped, `` ;`` starts a comment, ``$(circus.x)`` and
``((circus.x))`` are substituted, and in ``[env:...]`` sections ``$NAME`` is
replaced by circusd's own environment. Commands are split with ``shlex``.
:func:`circus_ini` quotes commands for that and refuses (with
:class:`SettingsError`, naming the setting) a value circus would change.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from circus.plugins import get_plugin_cmd

from . import privileges
from .memory import glibc_tunables
from .mongrel2 import MONGREL2_WORKING_DIR, require_resolved
from .mongrel2_binary import Mongrel2Binary, locate
from .reloader import check_available
from .rundir import RunDir
from .settings import Settings, SettingsError, _render, _render_item

#: Seconds between circusd's checks of its watchers: a crashed process is
#: respawned within this delay.
CHECK_DELAY = 0.5
#: mongrel2 stops gracefully in 2-4 s after SIGTERM.
MONGREL2_GRACEFUL_TIMEOUT = 5.0
#: Time circus allows past graceful_timeout before SIGKILL, for the process's own exit.
STOP_MARGIN = 2.0
#: The flapping plugin circus.ini loads: a fixed subclass of circus's own.
FLAPPING_PLUGIN = "circus_wsgi.flapping.Flapping"
#: The autoscaling plugin, loaded when workers_max is above workers_min.
AUTOSCALE_PLUGIN = "circus_wsgi.autoscale.Autoscaler"
#: circus's log level for each log_level of the stack (circus's DEBUG logs every command).
CIRCUS_LOG_LEVELS = {"debug": "info", "info": "warning", "warning": "warning", "error": "error"}

#: What circus substitutes in a value, and how its parser ends a value early.
_CIRCUS_VARIABLE = re.compile(r"\$\(circus\.[\w.-]+\)|\(\(circus\.[\w.-]+\)\)", re.I)
_ENV_VARIABLE = re.compile(r"\$[A-Z]")
_COMMENT = re.compile(r"\s;")

Section = tuple[str, str, dict[str, str]]  # name, comment, options


def _refuse(name: str, value: object, text: str, reason: str) -> None:
    raise SettingsError(name, value, f"cannot be written to circus.ini: {reason} in {text!r}")


def _check_text(name: str, value: object, text: str) -> None:
    """Refuse what circus would read differently anywhere in a value or command."""
    if "\n" in text or "\r" in text:
        _refuse(name, value, text, "a line break")
    if _CIRCUS_VARIABLE.search(text):
        _refuse(name, value, text, "circus would substitute $(circus.*)")


def _raw(name: str, value: object, text: str) -> str:
    """``text`` as an ini value circus reads back unchanged (commands are quoted instead)."""
    _check_text(name, value, text)
    if text != text.strip() or text == '""':
        _refuse(name, value, text, "circus strips spaces around a value")
    if _COMMENT.search(text):
        _refuse(name, value, text, "' ;' starts a comment")
    return text


def _command(argv: list[str]) -> str:
    """``argv`` as one circus ``cmd``: shlex-quoted, with every ``;`` escaped.

    shlex.quote puts any argument holding ``;`` in single quotes; ending the quote
    around an escaped ``\\;`` keeps circus's parser from seeing `` ;`` (a comment).
    """
    return shlex.join(argv).replace(";", "'\\;'")


def _check_settings_text(settings: Settings) -> None:
    """Every setting goes on the dispatcher's and workers' command line: check them all."""
    for name, value in settings.changed().items():
        texts = [_render_item(item) for item in value] if isinstance(value, tuple) \
            else [_render(value)]
        for text in texts:
            _check_text(name, value, text)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _streams(prefix: str, kind: str = "PrefixedStream", **extra: str) -> dict[str, str]:
    """Send a watcher's stdout and stderr to circusd's output, each line prefixed
    (by a :mod:`.logstream` class ``kind``, with the stream options ``extra``)."""
    options = {}
    for stream in ("stdout_stream", "stderr_stream"):
        options[f"{stream}.class"] = f"circus_wsgi.logstream.{kind}"
        options[f"{stream}.prefix"] = prefix
        options.update({f"{stream}.{key}": value for key, value in extra.items()})
    return options


def _circus_log_level(settings: Settings) -> str:
    """The level of circus's own processes (circusd, circusd-stats, the plugin): one step
    quieter than the stack's, so its INFO lines (each watcher started, stopped) show at
    log_level debug only."""
    return CIRCUS_LOG_LEVELS[settings.log_level]


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _run_as(settings: Settings) -> dict[str, str]:
    """The watcher options that make circus start its processes as the stack's user."""
    who = privileges.identity(settings)
    return {"uid": who.user, "gid": who.group} if who else {}


def _circus_section(settings: Settings, run: RunDir) -> Section:
    if settings.endpoint:
        endpoint = _raw("endpoint", settings.endpoint, settings.endpoint)
    else:
        endpoint = _raw("run_dir", settings.run_dir, run.circus_endpoint)
    stats = _raw("run_dir", settings.run_dir, run.circus_stats)
    return ("circus", f"circusd itself. Control: circusctl --endpoint {endpoint} list; "
            f"watch: circus-top --endpoint {stats}", {
                "endpoint": endpoint,
                "pubsub_endpoint": _raw("run_dir", settings.run_dir, run.circus_pubsub),
                # The only way plugin output (the flapping plugin's decisions) reaches
                # circusd's output; it changes nothing else of circusd's own logging.
                "debug": "True",
                "multicast_endpoint": "",  # no UDP discovery socket on 0.0.0.0:12027
                "check_delay": _number(CHECK_DELAY),
                "loglevel": _circus_log_level(settings),
            })


def _mongrel2_section(settings: Settings, mongrel2_db: Path, binary: Mongrel2Binary
                      ) -> Section:
    program = [binary.path, str(mongrel2_db), settings.server_uuid]
    who = privileges.identity(settings)
    if who is None:
        argv = _python("circus_wsgi.lifeline", *program)
        how = "run through lifeline so it dies with circusd"
    else:
        argv = privileges.mongrel2_argv(program, who, int(settings.bind.rpartition(":")[2]))
        how = f"run as {who.user} through setpriv, which also makes it die with circusd"
    return ("watcher:mongrel2", f"The HTTP server, {how}. SIGHUP does not reload it: "
            "restart it for a new config.sqlite.", {
                "cmd": _command(argv),
                "working_dir": MONGREL2_WORKING_DIR,
                "singleton": "True",
                "numprocesses": "1",
                "priority": "3",
                "graceful_timeout": _number(MONGREL2_GRACEFUL_TIMEOUT),
                "copy_env": "True",
                **_streams("mongrel2", "Mongrel2Stream", level=settings.log_level),
            })


def _stats_section(settings: Settings, run: RunDir) -> Section:
    """circusd-stats, which circus-top reads, as an ordinary watcher.

    circus's own ``statsd = True`` would start it without a parent-death signal
    (it outlived a killed circusd) and at DEBUG level whenever ``debug`` is on.
    """
    endpoint = settings.endpoint or run.circus_endpoint
    argv = _python("circus_wsgi.lifeline", sys.executable, "-c",
                   "from circus import stats; stats.main()", "--endpoint", endpoint,
                   "--pubsub", run.circus_pubsub, "--statspoint", run.circus_stats,
                   "--log-level", _circus_log_level(settings))
    run_as = _run_as(settings)
    if run_as:  # it starts first (priority): circusd's sockets become the user's
        run_as["hooks.before_start"] = privileges.HOOK
    return ("watcher:circusd-stats", "Per-process CPU and memory for circus-top.", {
        "cmd": _command(argv),
        "singleton": "True",
        "numprocesses": "1",
        "priority": "4",
        "copy_env": "True",
        **run_as,
        **_streams("circusd-stats"),
    })


def _dispatcher_section(settings: Settings) -> Section:
    return ("watcher:dispatcher", "The broker between mongrel2 and the workers. It may "
            "take as long as the workers to stop, to route their last responses.", {
                "cmd": _command(_python("circus_wsgi", "dispatcher", *settings.to_argv())),
                "working_dir": "/",  # it needs none; do not hold the caller's
                "singleton": "True",
                "numprocesses": "1",
                "priority": "2",
                "graceful_timeout": _number(settings.graceful_timeout + STOP_MARGIN),
                "copy_env": "True",
                **_run_as(settings),
                **_streams("dispatcher"),
            })


def _workers_section(settings: Settings) -> Section:
    options = {
        "cmd": _command(_python("circus_wsgi", "worker", *settings.to_argv())),
        "numprocesses": str(settings.starting_workers),
        "working_dir": _raw("chdir", settings.chdir, settings.chdir),
        "priority": "1",
        "graceful_timeout": _number(settings.graceful_timeout + STOP_MARGIN),
        "copy_env": "True",
        **_run_as(settings),
    }
    if settings.virtualenv:
        options["virtualenv"] = _raw("virtualenv", settings.virtualenv, settings.virtualenv)
    return ("watcher:workers", "The WSGI application, numprocesses processes "
            "(circusctl incr/decr workers).", {**options, **_streams("workers")})


def _redirect_sections(settings: Settings) -> list[Section]:
    """The plain-HTTP port that redirects to HTTPS: a circus socket, bound by circusd,
    and the process answering on it (:mod:`.redirect`)."""
    if not settings.http_redirect:
        return []
    host, _, port = settings.http_redirect.rpartition(":")
    argv = _python("circus_wsgi.redirect", "--fd", "$(circus.sockets.redirect)",
                   "--https-port", settings.bind.rpartition(":")[2])
    return [("socket:redirect", "The plain-HTTP port (setting http_redirect).", {
        "host": host, "port": port, "family": "AF_INET6" if ":" in host else "AF_INET",
        "blocking": "True"}),
        ("watcher:http-redirect", "Answers plain HTTP with a redirect to HTTPS.", {
            "cmd": _command(argv),
            "use_sockets": "True",
            "working_dir": "/",
            "singleton": "True",
            "numprocesses": "1",
            "priority": "2",
            "copy_env": "True",
            **_run_as(settings),
            **_streams("http-redirect"),
        })]


def _reloader_section(settings: Settings) -> Section:
    check_available(settings)
    return ("watcher:reloader", "--reload: reloads the workers gracefully when the "
            "application's files change (for development).", {
                "cmd": _command(_python("circus_wsgi", "reloader", *settings.to_argv())),
                "working_dir": _raw("chdir", settings.chdir, settings.chdir),
                "singleton": "True",
                "numprocesses": "1",
                "priority": "0",
                "copy_env": "True",
                **_run_as(settings),
                **_streams("reloader"),
            })


def _env_section(watcher: str, comment: str, env: dict[str, str]) -> Section:
    """``[env:WATCHER]``: ``env`` added to the watcher's environment, each value checked."""
    for name, value in env.items():
        _raw("env", f"{name}={value}", value)
        if _ENV_VARIABLE.search(value):
            _refuse("env", f"{name}={value}", value, "circus would replace $NAME")
    return (f"env:{watcher}", comment, env)


def _env_sections(settings: Settings, binary: Mongrel2Binary) -> list[Section]:
    sections = []
    mongrel2_env, why = binary.environment(), []
    if mongrel2_env:
        why.append("its prefix's libraries (setting mongrel2)")
    # A GLIBC_TUNABLES where the file is written is the user's own tuning: the file then
    # sets none, and mongrel2 gets circusd's environment as it is (copy_env).
    if "GLIBC_TUNABLES" not in os.environ:
        mongrel2_env["GLIBC_TUNABLES"] = glibc_tunables()
        why.append("malloc tuned like the Python processes' (circus_wsgi.memory): large "
                   "bodies reuse memory")
    if mongrel2_env:
        sections.append(_env_section("mongrel2", "mongrel2's environment: " + "; ".join(why)
                                     + ".", mongrel2_env))
    return sections + _workers_env_sections(settings)


def _workers_env_sections(settings: Settings) -> list[Section]:
    env = dict(settings.env)  # a name given twice: the last value wins, as in os.environ
    if not env:
        return []
    return [_env_section("workers", "Environment variables of the workers (setting env).", env)]


def _http_watcher_section(settings: Settings, name: str, token_file: Path,
                          comment: str) -> Section:
    """The watcher of ``circus-wsgi NAME`` (metrics, console): it listens where the
    setting NAME says, and reads the token of ``NAME_token`` from a file, never from its
    command line (``token_file`` when the settings hold the token itself)."""
    argv = _python("circus_wsgi", name,
                   *settings.to_argv(["run_dir", name, "endpoint", "log_level"]))
    token = getattr(settings, f"{name}_token")
    if token:
        argv += [f"--{name}-token", token if token.startswith("@") else f"@{token_file}"]
    return (f"watcher:{name}", comment, {
        "cmd": _command(argv),
        "working_dir": "/",
        "singleton": "True",
        "numprocesses": "1",
        "priority": "0",
        "copy_env": "True",
        **_streams(name),
        **_run_as(settings),
    })


def _autoscale_section(settings: Settings, run: RunDir) -> Section:
    return _plugin_section(settings, run, "autoscale", "Sets the number of workers from "
                           "the load (circus_wsgi.autoscale).", {
                               "use": AUTOSCALE_PLUGIN,
                               "watcher": "workers",
                               "min": str(settings.workers_min),
                               "max": str(settings.workers_max),
                               "scale_down_idle": _number(settings.scale_down_idle),
                               "run_dir": _raw("run_dir", settings.run_dir, settings.run_dir),
                           })


def _flapping_section(settings: Settings, run: RunDir) -> Section:
    return _plugin_section(settings, run, "flapping", "Stops a watcher whose processes "
                           "crash in a loop.", {
        "use": FLAPPING_PLUGIN,
        "attempts": str(settings.flapping_attempts),
        "window": _number(settings.flapping_window),
        "retry_in": _number(settings.flapping_retry_in),
        "retries": str(settings.flapping_max_retry),  # max_retry is also circus's own
        "run_dir": _raw("run_dir", settings.run_dir, settings.run_dir),  # notes decisions
    })


def _plugin_section(settings: Settings, run: RunDir, name: str, comment: str,
                    options: dict[str, str]) -> Section:
    """A plugin, with circus's own command for it but at our level (with ``debug``, which
    gives a plugin its output, circus would run it at DEBUG), as the stack's user."""
    endpoint = settings.endpoint or run.circus_endpoint
    cmd = get_plugin_cmd(dict(options), endpoint, run.circus_pubsub, CHECK_DELAY, None,
                         loglevel=_circus_log_level(settings))
    return (f"plugin:{name}", comment, {
        **options, "cmd": _command(shlex.split(cmd)), **_run_as(settings)})


def _check_virtualenv(settings: Settings) -> None:
    """circus adds the virtualenv's site-packages for this Python version; it must exist."""
    if not settings.virtualenv:
        return
    version = "%d.%d" % sys.version_info[:2]
    site = Path(settings.virtualenv, "lib", f"python{version}", "site-packages")
    if not site.is_dir():
        raise SettingsError("virtualenv", settings.virtualenv,
                            f"must be a virtualenv for Python {version} ({site} is missing)")


def _sections(settings: Settings, mongrel2_db: Path) -> list[Section]:
    """The sections of circus.ini for these resolved settings, in file order.

    ``mongrel2_db`` is the config.sqlite mongrel2 is started on.
    """
    require_resolved(settings)
    if not settings.app:
        raise SettingsError("app", settings.app,
                            "required: the WSGI application as MODULE:CALLABLE")
    _check_settings_text(settings)
    _check_virtualenv(settings)
    run = RunDir(Path(settings.run_dir))
    sections = [_circus_section(settings, run), _stats_section(settings, run)]
    if settings.role == "workers":  # a host of workers for the front given by connect
        return sections + [_workers_section(settings), *_workers_env_sections(settings),
                           _flapping_section(settings, run)]
    binary = locate(settings.mongrel2)
    sections.append(_mongrel2_section(settings, mongrel2_db, binary))
    if settings.mode == "dispatcher":
        sections.append(_dispatcher_section(settings))
    sections.append(_workers_section(settings))
    if settings.metrics:
        sections.append(_http_watcher_section(settings, "metrics", run.metrics_token,
                                              "The Prometheus endpoint (circus-wsgi metrics)."))
    if settings.console:
        sections.append(_http_watcher_section(settings, "console", run.console_token,
                                              "The web console (circus-wsgi console)."))
    if settings.reload:
        sections.append(_reloader_section(settings))
    sections += _redirect_sections(settings)
    sections += _env_sections(settings, binary)
    sections.append(_flapping_section(settings, run))
    if settings.autoscaling:
        sections.append(_autoscale_section(settings, run))
    return sections


def circus_ini(settings: Settings, mongrel2_db: Path) -> str:
    """circus.ini text for resolved settings (see :meth:`Settings.with_defaults_resolved`)
    that starts mongrel2 on ``mongrel2_db``."""
    lines = [
        "# circus.ini written by circus-wsgi from its Settings. Regenerate it (circus-wsgi",
        "# config ... --out DIR, or write_configs(settings, DIR)) rather than edit it.",
        "# Run the stack: circusd circus.ini",
    ]
    for name, comment, options in _sections(settings, mongrel2_db):
        lines += ["", f"# {comment}", f"[{name}]"]
        lines += [f"{key} = {value}".rstrip() for key, value in options.items()]
    return "\n".join(lines) + "\n"
