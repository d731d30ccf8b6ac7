"""The ``circus-wsgi`` command: serve, config, worker, dispatcher, reloader, status,
metrics, console.

Every subcommand takes the same setting flags, made from
:data:`circus_wsgi.settings.SETTINGS`; ``--settings FILE`` loads a Python
settings file first and the flags given override it. A bad value prints one
line and exits with status 2 before anything starts.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from .settings import SETTINGS, Settings, SettingsError

USAGE_ERROR = 2


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(settings)


def _config(settings: Settings, args: argparse.Namespace) -> int:
    from .deploy import write_configs
    from .hooks import serve_only
    from .privileges import check_switch
    from .serve import ServeError, check_app, check_keys

    check_switch(settings)
    try:
        check_keys(settings)
        if not args.no_check_app:
            check_app(settings)
    except ServeError as error:
        print(f"circus-wsgi: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    paths = write_configs(settings, args.out)
    names = serve_only(settings)
    if names:
        listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        print(f"circus-wsgi: warning: {listed} run{'s' * (len(names) == 1)} only under "
              "circus-wsgi serve, not under circusd", file=sys.stderr)
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from .worker import run_worker

    return run_worker(settings)


def _dispatcher(settings: Settings, args: argparse.Namespace) -> int:
    from .dispatcher import run_dispatcher

    return run_dispatcher(settings)


def _metrics(settings: Settings, args: argparse.Namespace) -> int:
    from .metrics import run_metrics

    return run_metrics(settings)


def _reloader(settings: Settings, args: argparse.Namespace) -> int:
    from .reloader import run_reloader

    return run_reloader(settings)


def _console(settings: Settings, args: argparse.Namespace) -> int:
    from .console import run_console

    return run_console(settings)


def _keys(args: argparse.Namespace) -> int:
    """``circus-wsgi keys DIR [--name NAME]``: a CURVE key pair for a front or worker host."""
    from .curve import CurveKeysError, write_pair

    try:
        public, secret = write_pair(args.directory, args.name)
    except (CurveKeysError, OSError) as error:
        print(f"circus-wsgi: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    print(f"wrote {public}: copy it into the authorized/ directory of each peer to trust")
    print(f"wrote {secret} (mode 0600): it stays on this host")
    return 0


def _status(settings: Settings, args: argparse.Namespace) -> int:
    from .status import print_status

    return print_status(settings)


KEYS_HELP = ("write a CURVE key pair (zmq.auth's files) for a front or a worker host, and "
             "its authorized/ directory for the public keys it trusts")

_COMMANDS: dict[str, tuple[str, Callable[[Settings, argparse.Namespace], int]]] = {
    "serve": ("run the whole stack in the foreground: mongrel2, dispatcher, workers", _serve),
    "config": ("write config.sqlite, mongrel2.conf and circus.ini into --out DIR", _config),
    "worker": ("run one worker (what circus runs for the workers watcher)", _worker),
    "dispatcher": ("run the dispatcher (what circus runs for the dispatcher watcher)",
                   _dispatcher),
    "reloader": ("watch the application's files and reload the workers when one changes "
                 "(what circus runs for --reload)", _reloader),
    "status": ("print the dispatcher's counters: queue, busy and idle workers, 5xx", _status),
    "metrics": ("serve GET /metrics for Prometheus (what circus runs for the metrics "
                "watcher)", _metrics),
    "console": ("serve the web console of the stack in --run-dir (what circus runs for the "
                "console watcher; without --console, on a free port of 127.0.0.1)", _console),
}


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", metavar="FILE",
                        help="a Python file that assigns settings = Settings(...)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in SETTINGS:
        if setting.name == "app":
            parser.add_argument("app", nargs="?", default=argparse.SUPPRESS, metavar="APP",
                                help=setting.help)
            continue
        group = groups.setdefault(setting.section,
                                  parser.add_argument_group(f"{setting.section} settings"))
        help_text = f"{setting.help} (default: {_show_default(setting.default)})"
        if setting.switch:
            group.add_argument(setting.flag, dest=setting.name, action="store_const",
                               const=True, default=argparse.SUPPRESS, help=help_text)
            continue
        group.add_argument(
            setting.flag, dest=setting.name, metavar=setting.metavar or None,
            action="append" if setting.repeat else "store", default=argparse.SUPPRESS,
            help=help_text)


def _show_default(value: object) -> str:
    if value in ((), "", None):
        return "none"
    return str(value).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``circus-wsgi`` command."""
    parser = argparse.ArgumentParser(
        prog="circus-wsgi",
        description="Run a WSGI application behind Mongrel2, every process managed by Circus.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (summary, _) in _COMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        _add_setting_flags(sub)
        if name == "config":
            sub.add_argument("--out", required=True, metavar="DIR",
                             help="directory to write the configuration files into")
            sub.add_argument("--no-check-app", action="store_true",
                             help="do not check first that the app imports, as the workers "
                                  "would import it (for a machine that cannot import it)")
    keys = commands.add_parser("keys", help=KEYS_HELP, description=KEYS_HELP)
    keys.add_argument("directory", metavar="DIR", help="the key directory (created if new)")
    keys.add_argument("--name", default="", metavar="NAME",
                      help="the pair's name: NAME.key and NAME.key_secret (default: this "
                           "host's name)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from ``--settings FILE`` (if given) overridden by the flags given."""
    given = {s.name: getattr(args, s.name) for s in SETTINGS if hasattr(args, s.name)}
    if args.settings:
        return Settings.from_file(args.settings).replace(**given)
    return Settings(**given)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``circus-wsgi`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "keys":
        return _keys(args)
    _, run = _COMMANDS[args.command]
    try:
        settings = settings_from_args(args)
        return run(settings, args)
    except SettingsError as error:
        print(f"circus-wsgi: error: {error}", file=sys.stderr)
        return USAGE_ERROR
