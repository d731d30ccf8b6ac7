"""Every option of circus-wsgi, declared once.

Each :class:`Setting` carries its name, default, converter (which is also its
validator), command-line flag and help text. The command line (:mod:`cli`),
the validation messages and the settings reference in the docs are all made
from :data:`SETTINGS`, so a setting exists exactly where it is declared here.

:class:`Settings` is the single object the rest of the library reads:
``Settings(app="myapp:app", workers=4)``. Values are converted and checked at
construction; a bad one raises :class:`SettingsError`, whose message is one
line naming the setting, the value and what is allowed.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import runpy
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

from .rundir import IPC_PATH_MAX, RUN_DIR_MAX

from .callref import REFERENCE, arguments_taken, reference_of

__all__ = ["Setting", "Settings", "SettingsError", "SETTINGS"]

#: The cipher suites mongrel2 offers by default (setting ciphers), in mbedTLS's names:
#: forward-secret (ECDHE) and AEAD only, which are TLS 1.2's alone. mbedTLS 2.28 offers
#: TLS 1.0 to 1.2 and every suite it has unless told; mongrel2 has no setting for the
#: protocol version, so the suites are what refuses TLS 1.0 and 1.1 (docs/deployment.rst).
DEFAULT_CIPHERS = " ".join(
    f"TLS-ECDHE-{key}-WITH-{cipher}" for cipher in (
        "AES-128-GCM-SHA256", "AES-256-GCM-SHA384", "CHACHA20-POLY1305-SHA256")
    for key in ("ECDSA", "RSA"))


class SettingsError(ValueError):
    """A setting has a value it cannot take; the message is one line."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"setting {name!r}: invalid value {value!r}: {allowed}")


# --------------------------------------------------------------------------
# Converters: take a value from Python or a string from the command line,
# return the canonical value, raise ValueError("what is allowed") otherwise.


def _integer(minimum: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer >= {minimum}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be an integer >= {minimum}") from None
        if number < minimum or (isinstance(value, float) and value != number):
            raise ValueError(f"must be an integer >= {minimum}")
        return number

    convert.kind = f"integer >= {minimum}"  # type: ignore[attr-defined]
    return convert


def _seconds(minimum: float) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number of seconds >= {minimum:g}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number of seconds >= {minimum:g}") from None
        if not number >= minimum or number == float("inf"):
            raise ValueError(f"must be a number of seconds >= {minimum:g}")
        return number

    convert.kind = f"seconds >= {minimum:g}"  # type: ignore[attr-defined]
    return convert


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


_boolean.kind = "true or false"  # type: ignore[attr-defined]


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


_text.kind = "string"  # type: ignore[attr-defined]

_APP_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(\))?$")


def _app(value: Any) -> str:
    if value is None:
        return None  # type: ignore[return-value]
    if not isinstance(value, str) or not _APP_RE.match(value):
        raise ValueError("must be MODULE:CALLABLE or MODULE:FACTORY() (for example myapp:app)")
    return value


_app.kind = "MODULE:CALLABLE"  # type: ignore[attr-defined]


def _bind(value: Any) -> str:
    allowed = "must be HOST:PORT with a port from 1 to 65535 (for example 127.0.0.1:8000)"
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(allowed)
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(allowed)
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(allowed + "; HOST must be an IP address or localhost") from None
    return f"{host}:{int(port)}"


_bind.kind = "HOST:PORT"  # type: ignore[attr-defined]


def _listen(value: Any) -> str:
    """An optional ``[HOST:]PORT`` to listen on; HOST defaults to 127.0.0.1."""
    if value in ("", None):
        return ""
    text = str(value)
    return _bind(text if ":" in text else f"127.0.0.1:{text}")


_listen.kind = "[HOST:]PORT"  # type: ignore[attr-defined]


def _secret(value: Any) -> str:
    """A token, or ``@FILE`` naming a file that holds it."""
    if not isinstance(value, str) or any(c.isspace() for c in value.strip()):
        raise ValueError("must be a token without spaces, or @FILE")
    return value.strip()


_secret.kind = "TOKEN | @FILE"  # type: ignore[attr-defined]


def _directory_path(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a path")
    return os.path.abspath(value) if value else ""


_directory_path.kind = "path"  # type: ignore[attr-defined]


def _endpoint(value: Any) -> str:
    if value in ("", None):
        return ""
    match = isinstance(value, str) and re.match(r"^(?:ipc://(.+)|tcp://[^:]+:(\d+))$", value)
    if not match:
        raise ValueError("must be ipc://PATH or tcp://HOST:PORT")
    path, port = match.groups()
    if path and len(path.encode()) > IPC_PATH_MAX:
        raise ValueError(f"an ipc path may have at most {IPC_PATH_MAX} bytes")
    if port and not 0 < int(port) < 65536:
        raise ValueError("the port must be from 1 to 65535")
    return value


_endpoint.kind = "ZeroMQ endpoint"  # type: ignore[attr-defined]


def _tcp_endpoint(value: Any) -> str:
    endpoint = _endpoint(value)
    if endpoint.startswith("ipc://"):
        raise ValueError("must be tcp://HOST:PORT")
    return endpoint


_tcp_endpoint.kind = "tcp://HOST:PORT"  # type: ignore[attr-defined]


def _pairs(what: str, check_key: Callable[[str], str], check_value: Callable[[str], str]):
    """A list of KEY=VALUE pairs, given as a mapping, a list of pairs or of "K=V" strings."""

    def convert(value: Any) -> tuple[tuple[str, str], ...]:
        if isinstance(value, str):
            value = [value]
        try:
            items = list(value.items() if isinstance(value, Mapping) else value)
        except TypeError:
            raise ValueError(f"must be {what}") from None
        result = []
        for item in items:
            if isinstance(item, str):
                key, sep, val = item.partition("=")
                if not sep:
                    raise ValueError(f"must be {what}")
            else:
                try:
                    key, val = item
                except (TypeError, ValueError):
                    raise ValueError(f"must be {what}") from None
            result.append((check_key(str(key)), check_value(str(val))))
        return tuple(result)

    convert.kind = f"list of {what}"  # type: ignore[attr-defined]
    return convert


def _url_prefix(prefix: str) -> str:
    if not re.match(r"^/[^\s=(]*$", prefix):
        raise ValueError("each URL prefix must start with / and hold no space, = or (")
    return prefix


def _existing_directory(path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"directory {path} does not exist")
    return os.path.abspath(path)


def _existing_directory_path(value: Any) -> str:
    return _existing_directory(_directory_path(value))


_existing_directory_path.kind = "existing directory"  # type: ignore[attr-defined]


def _env_name(name: str) -> str:
    if not re.match(r"^[A-Za-z_]\w*$", name):
        raise ValueError("each name must be a valid environment variable name")
    return name


def _mount_app(app: str) -> str:
    return _app(app)


def _any(value: str) -> str:
    return value


def _uuid(value: Any) -> str:
    if value in ("", None):
        return ""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError("must be a UUID (for example "
                         "f400bf85-4538-4f7a-8908-67e313d515c2)") from None


_uuid.kind = "UUID"  # type: ignore[attr-defined]


def _choice(*choices: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return value

    convert.kind = " | ".join(choices)  # type: ignore[attr-defined]
    return convert


# Converters of the security settings: HTTPS, privileges, trusted proxies


def _file_path(value: Any) -> str:
    """A file's absolute path; whether it can be read is checked before the stack starts
    (workers, which may not read it, convert the same value)."""
    if not isinstance(value, str):
        raise ValueError("must be a path")
    return os.path.abspath(value) if value else ""


_file_path.kind = "file"  # type: ignore[attr-defined]


def _optional_bind(value: Any) -> str:
    return "" if value in ("", None) else _bind(value)


_optional_bind.kind = "HOST:PORT"  # type: ignore[attr-defined]


def _cipher_suites(value: Any) -> str:
    """Cipher suite names as mongrel2 reads them: mbedTLS's, separated by one space."""
    names = value.replace(",", " ").split() if isinstance(value, str) else value
    try:
        suites = [name.strip().upper().replace("_", "-") for name in names]
    except (TypeError, AttributeError):
        raise ValueError("must be cipher suite names separated by spaces") from None
    if not suites or not all(re.fullmatch(r"TLS-[A-Z0-9-]+-WITH-[A-Z0-9-]+", s) for s in suites):
        raise ValueError("must be TLS 1.2 cipher suite names (IANA's or mbedTLS's, such as "
                         "TLS-ECDHE-RSA-WITH-AES-128-GCM-SHA256) separated by spaces")
    return " ".join(suites)


_cipher_suites.kind = "cipher suites"  # type: ignore[attr-defined]


def _account(what: str, by_id: Callable[[int], Any], by_name: Callable[[str], Any]
             ) -> Callable[[Any], str]:
    """A user or group of this machine, by name or number; kept as its name."""
    def convert(value: Any) -> str:
        if value in ("", None):
            return ""
        try:
            entry = by_id(int(value)) if str(value).isdigit() else by_name(str(value))
        except (KeyError, OverflowError):
            raise ValueError(f"no such {what} on this machine") from None
        return entry[0]  # pw_name, gr_name

    convert.kind = f"{what} name or {what[0]}id"  # type: ignore[attr-defined]
    return convert


_user = _account("user", pwd.getpwuid, pwd.getpwnam)
_group = _account("group", grp.getgrgid, grp.getgrnam)


def _address_list(value: Any) -> str:
    """Addresses and networks (or ``*``), as gunicorn's forwarded_allow_ips: "a,b,c"."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        addresses = [str(item).strip() for item in items]
    except TypeError:
        raise ValueError("must be IP addresses or networks separated by commas, or *") from None
    for address in filter(None, addresses):
        if address != "*":
            try:
                ipaddress.ip_network(address)
            except ValueError:
                raise ValueError(f"{address!r} is not an IP address or network (such as "
                                 "10.0.0.0/8); separate them by commas, or give *") from None
    return ",".join(filter(None, addresses))


_address_list.kind = "addresses"  # type: ignore[attr-defined]


#: The server hooks (gunicorn's) and their positional arguments, with the fewest a hook
#: may take: post_request may leave out environ and resp, as in gunicorn.
HOOK_ARGUMENTS: dict[str, tuple[tuple[str, ...], int]] = {
    "on_starting": (("server",), 1), "when_ready": (("server",), 1),
    "on_exit": (("server",), 1), "post_worker_init": (("worker",), 1),
    "worker_exit": (("server", "worker"), 2), "pre_request": (("worker", "req"), 2),
    "post_request": (("worker", "req", "environ", "resp"), 2),
}


def _hook(name: str) -> Callable[[Any], Any]:
    """A server hook: a function, or a reference naming one (resolved where it runs)."""
    arguments, fewest = HOOK_ARGUMENTS[name]

    def convert(value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            if not REFERENCE.match(value):
                raise ValueError("must be a function, or MODULE:NAME or FILE.py:NAME naming one")
            return value
        reference_of(value)  # the workers must be able to find it
        arguments_taken(value, len(arguments), fewest)
        return value

    convert.kind = "function or MODULE:NAME"  # type: ignore[attr-defined]
    return convert


def _existing_paths(value: Any) -> tuple[str, ...]:
    paths = [value] if isinstance(value, (str, os.PathLike)) else value
    try:
        absolute: list[str] = [os.path.abspath(path) for path in paths]
    except TypeError:
        raise ValueError("must be a list of paths") from None
    paths = absolute
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path} does not exist")
    return tuple(paths)


_existing_paths.kind = "list of existing files or directories"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One option: its name, default, converter, command-line flag and help text."""

    name: str
    section: str
    default: Any
    convert: Callable[[Any], Any]
    help: str
    metavar: str = ""
    repeat: bool = False  # the flag may be given several times, building a list
    secret: bool = False  # never on a command line (others can read those): see to_argv
    switch: bool = False  # the flag takes no value: given, it sets True
    cli: str = ""  # the flag, when it is not the name's (gunicorn's --reload-extra-file)

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> str:
        return getattr(self.convert, "kind", "")


_S = Setting

SETTINGS: tuple[Setting, ...] = (
    # -- application
    _S("app", "application", None, _app,
       "The WSGI application, as MODULE:CALLABLE, or MODULE:FACTORY() for a factory "
       "that returns it. Mounted at /.", "APP"),
    _S("mounts", "application", (), _pairs("PREFIX=APP", _url_prefix, _mount_app),
       "More applications, each mounted at a URL prefix (its SCRIPT_NAME).", "PREFIX=APP", True),
    _S("chdir", "application", ".", _existing_directory_path,
       "Directory put first on sys.path and made the workers' working directory.", "DIR"),
    _S("env", "application", (), _pairs("NAME=VALUE", _env_name, _any),
       "Environment variables set for the workers.", "NAME=VALUE", True),
    _S("virtualenv", "application", "", _directory_path,
       "A virtualenv whose site-packages the workers use.", "DIR"),
    # -- server
    _S("bind", "server", "127.0.0.1:8000", _bind,
       "Address and port mongrel2 listens on for HTTP.", "HOST:PORT"),
    _S("static", "server", (), _pairs("PREFIX=DIR", _url_prefix, _existing_directory),
       "Serve the files of DIR at URL PREFIX straight from mongrel2.", "PREFIX=DIR", True),
    _S("server_uuid", "server", "", _uuid,
       "mongrel2's server UUID; default: derived from bind and run_dir.", "UUID"),
    _S("run_dir", "server", "", _directory_path,
       "Private directory (mode 0700) for sockets, pid files, logs and uploads. Default: "
       "a fresh directory under /tmp for serve, OUT/run for config. Keep it short: "
       f"socket paths are limited: at most {RUN_DIR_MAX} bytes.", "DIR"),
    _S("mongrel2", "server", "", _text,
       "The mongrel2 binary: a path, or a command looked up on PATH. Default: the one make "
       "deps unpacked into this environment (.venv/mongrel2/usr/bin/mongrel2, where the "
       "system has no mongrel2-core package) if present, else mongrel2 on PATH. A binary in "
       "a prefix of its own runs with that prefix's lib directories as LD_LIBRARY_PATH.",
       "PATH"),
    _S("endpoint", "server", "", _endpoint,
       "circusd's control endpoint (what circusctl talks to). Default: an ipc socket in "
       "run_dir. A tcp:// endpoint lets anyone on the host control the stack.", "ENDPOINT"),
    # -- workers
    _S("workers", "workers", 2, _integer(1), "Number of worker processes.", "N"),
    _S("threads", "workers", 1, _integer(1),
       "Requests one worker process serves at once, each in its own thread.", "N"),
    _S("mode", "workers", "dispatcher", _choice("dispatcher", "direct"),
       "How workers get requests: from the dispatcher (default: load-balanced, nothing lost "
       "on scaling or crashes), or straight from mongrel2's sockets (direct).", "MODE"),
    _S("send_spec", "workers", "", _endpoint,
       "mongrel2's handler send_spec (its PUSH socket). Default: an ipc socket in run_dir; "
       "set it to attach workers in direct mode to a mongrel2 run by someone else.", "ENDPOINT"),
    _S("recv_spec", "workers", "", _endpoint,
       "mongrel2's handler recv_spec (its SUB socket). Default: an ipc socket in run_dir.",
       "ENDPOINT"),
    _S("prefetch", "workers", 16, _integer(0),
       "Requests a worker may hold beyond its threads while every worker is busy, so it "
       "starts the next one without waiting for the dispatcher. None go to a worker that "
       "has finished nothing for 5 ms, and a worker busy with one request for 20 ms hands "
       "back those it has not started, so none waits long behind a slow one. 0: a worker "
       "only ever holds as many requests as it has threads.", "N"),
    _S("graceful_timeout", "workers", 30.0, _seconds(0),
       "After SIGTERM, how long a worker may take to finish the requests it holds.", "S"),
    _S("timeout", "workers", 30.0, _seconds(1),
       "A request whose response has not started this long after it was handed to a worker "
       "gets 504, and the worker is killed and replaced.", "S"),
    _S("max_requests", "workers", 0, _integer(0),
       "A worker exits cleanly after this many requests and circus starts a fresh one "
       "(0: never).", "N"),
    _S("max_requests_jitter", "workers", 0, _integer(0),
       "A random 0..N added to max_requests per worker, so they do not all restart at once.",
       "N"),
    _S("max_worker_memory", "workers", 0, _integer(0),
       "A worker whose resident memory passes this many MiB finishes what it holds, exits "
       "cleanly and circus starts a fresh one, as after max_requests; checked every second "
       "(0: never).", "MIB"),
    # -- autoscaling
    _S("workers_min", "autoscaling", 1, _integer(1),
       "The fewest workers autoscaling leaves running.", "N"),
    _S("workers_max", "autoscaling", 0, _integer(0),
       "The most workers autoscaling starts; autoscaling is on when this is above "
       "workers_min, and workers (if given) is then the starting count, else workers_min. "
       "0: no autoscaling.", "N"),
    _S("scale_down_idle", "autoscaling", 60.0, _seconds(1),
       "Autoscaling stops one worker (gracefully) once some have been idle this long.", "S"),
    # -- dispatcher
    _S("queue_timeout", "dispatcher", 5.0, _seconds(0.1),
       "A request that no worker takes within this time gets 503 with Retry-After.", "S"),
    _S("max_queue", "dispatcher", 10000, _integer(1),
       "Requests the dispatcher holds waiting for a worker; past it, 503 at once. The "
       "default holds a request from each of 10,000 keep-alive clients (queue_timeout "
       "bounds how long each waits).", "N"),
    # -- limits
    _S("max_body_size", "limits", 100 * 1024 * 1024, _integer(0),
       "A request body larger than this gets 413 before it reaches the app (0: no limit).",
       "BYTES"),
    _S("content_length", "limits", 20480, _integer(1024),
       "mongrel2's limits.content_length: bodies up to this arrive inline; larger ones "
       "through a temporary file in run_dir.", "BYTES"),
    _S("buffer_size", "limits", 16384, _integer(4096),
       "mongrel2's limits.buffer_size: the largest request header block accepted.", "BYTES"),
    _S("min_ping", "limits", 120, _integer(0),
       "mongrel2's limits.min_ping: seconds before it reaps an idle connection (0: never).",
       "S"),
    _S("flow_control", "limits", True, _boolean,
       "mongrel2's download.flow_control: streamed responses are paced by the client's "
       "reading, keeping worker and mongrel2 memory bounded. Dispatcher mode only: in direct "
       "mode mongrel2 would deal credit notices to the wrong workers, so it is off there.",
       "BOOL"),
    # -- monitoring
    _S("metrics", "monitoring", "", _listen,
       "Serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1); "
       "off unless given.", "[HOST:]PORT"),
    _S("metrics_token", "monitoring", "", _secret,
       "A token scrapers must send as Authorization: Bearer TOKEN, or @FILE holding it. "
       "Needed when metrics listens on anything but a loopback address.", "TOKEN",
       secret=True),
    _S("console", "monitoring", "", _listen,
       "Serve the web console at http://HOST:PORT/ (HOST defaults to 127.0.0.1): the live "
       "stack in a browser, and buttons that steer it through circus; off unless given.",
       "[HOST:]PORT"),
    _S("console_token", "monitoring", "", _secret,
       "The console's token, or @FILE holding it: the ?token= of the URL serve prints, "
       "exchanged for a session cookie, or Authorization: Bearer TOKEN for scripts. "
       "Default: a new random token at every start.", "TOKEN", secret=True),
    # -- logging
    _S("access_log", "logging", "-", _text,
       "Where the workers write the access log: a file, - for stderr, or '' for none.", "FILE"),
    _S("access_log_format", "logging",
       '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(L)s', _text,
       "Access log line, in gunicorn's atoms: h remote address, t time, r request line, "
       "s status, b bytes, f referer, a user agent, D/L duration in us/s, and more.",
       "FORMAT"),
    _S("log_level", "logging", "info", _choice("debug", "info", "warning", "error"),
       "Level of the workers' and dispatcher's own log.", "LEVEL"),
    # -- flapping (crash-loop) control
    _S("flapping_attempts", "flapping", 3, _integer(1),
       "A watcher whose processes crash this many times within flapping_window is stopped.",
       "N"),
    _S("flapping_window", "flapping", 5.0, _seconds(0.1),
       "The window, in seconds, in which flapping_attempts crashes count as a crash loop.",
       "S"),
    _S("flapping_retry_in", "flapping", 5.0, _seconds(0),
       "Seconds to wait before starting a stopped watcher again.", "S"),
    _S("flapping_max_retry", "flapping", 2, _integer(0),
       "Restarts tried after a crash loop before the watcher stays stopped.", "N"),
    # -- security: HTTPS, privileges, trusted proxies (gunicorn's names)
    _S("certfile", "security", "", _file_path,
       "HTTPS: the certificate mongrel2 serves on bind (PEM: the server's certificate, then "
       "its chain). With keyfile, bind speaks TLS 1.2 only: mongrel2's mbedTLS 2.28 has no "
       "TLS 1.3.", "FILE"),
    _S("keyfile", "security", "", _file_path,
       "HTTPS: the private key of certfile (PEM, without a passphrase).", "FILE"),
    _S("ciphers", "security", DEFAULT_CIPHERS, _cipher_suites,
       "HTTPS: the cipher suites mongrel2 offers, most preferred first, by IANA or mbedTLS "
       "name. The default has only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305, "
       "which TLS 1.0 and 1.1 cannot use: those handshakes are refused.", "SUITES"),
    _S("http_redirect", "security", "", _optional_bind,
       "HTTPS: also listen for plain HTTP here and answer every request with a redirect to "
       "the same URL on HTTPS (301, or 308 for methods other than GET and HEAD). circusd "
       "binds it, so a port under 1024 works with user.", "HOST:PORT"),
    _S("user", "security", "", _user,
       "Run every process of the stack but circusd as this user: mongrel2 (which keeps only "
       "the right to bind a port under 1024), the dispatcher, the workers and circus's "
       "helpers. run_dir is made theirs. Needs root. None: the stack runs as whoever "
       "starts it.", "USER"),
    _S("group", "security", "", _group,
       "The group of those processes, with user (none: the user's primary group).",
       "GROUP"),
    _S("forwarded_allow_ips", "security", "127.0.0.1,::1", _address_list,
       "Proxies (addresses or networks, comma-separated; * for any) whose X-Forwarded-For, "
       "X-Forwarded-Proto and Forwarded headers set REMOTE_ADDR and wsgi.url_scheme. From any "
       "other peer those headers reach the app unchanged but change nothing.", "ADDRESSES"),
)

# -- server hooks (gunicorn's names, arguments and meanings; circus_wsgi.hooks calls them)
_HOOK_HELP = {
    "on_starting": "called by serve before it starts anything. If it raises, serve stops "
                   "with one line (exit status 2).",
    "when_ready": "called by serve once the stack serves (mongrel2 listens and a worker "
                  "is ready).",
    "post_worker_init": "called in each worker once it has loaded the application, before "
                        "it takes a request.",
    "pre_request": "called in the worker just before the application runs for a request.",
    "post_request": "called in the worker once the application's response is complete, "
                    "also when the application failed (environ and resp may be left out).",
    "worker_exit": "called in a worker that stops cleanly, after its last request.",
    "on_exit": "called by serve just before it exits.",
}
_HOOKS = tuple(
    _S(name, "server hooks", None, _hook(name),
       f"{name}({', '.join(HOOK_ARGUMENTS[name][0])}): {text}", "MODULE:NAME")
    for name, text in _HOOK_HELP.items())

# -- development
_DEVELOPMENT = (
    _S("reload", "development", False, _boolean,
       "Reload the workers gracefully (no request fails) when a Python file under chdir "
       "or of the application's packages changes; for development. Needs the watchfiles "
       "package (pip install 'circus-wsgi[reload]') and the dispatcher mode.", "",
       switch=True),
    _S("reload_extra_files", "development", (), _existing_paths,
       "A file or directory whose changes reload the workers too (templates and the "
       "like), with reload.", "PATH", True, cli="--reload-extra-file"),
)

# -- workers on other hosts (circus_wsgi.remote)
_REMOTE = (
    _S("role", "remote workers", "all", _choice("all", "workers"),
       "What this host runs: all (mongrel2, the dispatcher, workers), or workers alone, "
       "for the front given by connect.", "ROLE"),
    _S("remote_workers", "remote workers", "", _tcp_endpoint,
       "On the front: also take workers from other hosts at tcp://HOST:PORT (a ZeroMQ "
       "ROUTER, CURVE-encrypted with curve_keys).", "ENDPOINT"),
    _S("connect", "remote workers", "", _tcp_endpoint,
       "On a worker host: the front's remote_workers endpoint, tcp://HOST:PORT.", "ENDPOINT"),
    _S("curve_keys", "remote workers", "", _directory_path,
       "Key directory: this host's pair (NAME.key, NAME.key_secret; circus-wsgi keys DIR) "
       "and, in authorized/, the public keys it trusts (the front trusts its worker hosts', "
       "a worker host its front's).", "DIR"),
    _S("insecure_remote_workers", "remote workers", False, _boolean,
       "Let remote workers connect over plain TCP, without CURVE: anyone who reaches the "
       "port can take requests. For a network that is private already.", "", switch=True),
    _S("remote_timeout", "remote workers", 3.0, _seconds(0.5),
       "A remote worker (or front) heard from not at all this long is gone: the front "
       "answers what it had begun with 502 and gives the rest to other workers.", "S"),
)

SETTINGS += _HOOKS + _DEVELOPMENT + _REMOTE

_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


class Settings:
    """All options of one circus-wsgi deployment, converted and checked.

    ``Settings(app="myapp:app", bind="0.0.0.0:8080", workers=4)``; unknown names
    and bad values raise :class:`SettingsError`. Read values as attributes.
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        merged: dict[str, Any] = {}
        for name, value in values.items():
            setting = _BY_NAME.get(name)
            if setting is None:
                raise SettingsError(name, value, "no such setting (see circus-wsgi config --help)")
            try:
                merged[name] = setting.convert(value)
            except ValueError as error:
                raise SettingsError(name, value, str(error)) from None
        for setting in SETTINGS:
            merged.setdefault(setting.name, setting.default)
        object.__setattr__(self, "_values", merged)
        self._check_together()

    def _check_together(self) -> None:
        """Rules that involve more than one setting."""
        routes = {"/"}  # the app's
        for name in ("mounts", "static"):
            for prefix, _ in self._values[name]:
                route = prefix.rstrip("/") + "/"
                if route in routes:
                    raise SettingsError(name, prefix, "another route has this URL prefix")
                routes.add(route)
        _check_security(self._values)
        self._check_reload()
        if self.run_dir and len(self.run_dir.encode()) > RUN_DIR_MAX:
            raise SettingsError("run_dir", self.run_dir,
                                f"too long for ipc sockets: at most {RUN_DIR_MAX} bytes")
        if self.workers_max and self.workers_max < self.workers_min:
            raise SettingsError("workers_max", self.workers_max,
                                f"must be at least workers_min ({self.workers_min})")
        if self.autoscaling:
            if self.mode == "direct":
                raise SettingsError("workers_max", self.workers_max,
                                    "autoscaling needs the dispatcher (mode dispatcher)")
            if "workers" in self.changed() and not \
                    self.workers_min <= self.workers <= self.workers_max:
                raise SettingsError("workers", self.workers, "must be within workers_min.."
                                    f"workers_max ({self.workers_min}..{self.workers_max})")
        self._check_remote()
        if self.metrics and not self.metrics_token and not _loopback(self.metrics):
            raise SettingsError("metrics", self.metrics, "listening beyond this host needs "
                                "metrics_token: scrapers from elsewhere must authenticate")

    def _check_remote(self) -> None:
        for name in ("remote_workers", "connect"):
            value = self._values[name]
            if value and not self.curve_keys and not self.insecure_remote_workers:
                raise SettingsError(name, value, "needs curve_keys (CURVE), or "
                                    "insecure_remote_workers for plain TCP")
        if self.remote_workers and self.mode == "direct":
            raise SettingsError("remote_workers", self.remote_workers,
                                "remote workers need the dispatcher (mode dispatcher)")
        if self.role == "workers":
            if not self.connect:
                raise SettingsError("role", self.role, "a host of workers alone needs "
                                    "connect (the front's remote_workers endpoint)")
            for name in ("remote_workers", "metrics", "console", "reload", "workers_max"):
                if self._values[name]:
                    raise SettingsError(name, self._values[name], "runs on the front, not "
                                        "on a host of workers alone (role workers)")
        elif self.connect:
            raise SettingsError("connect", self.connect, "is for a host of workers alone: "
                                "give role workers too")

    @property
    def autoscaling(self) -> bool:
        """Whether the number of workers follows the load (workers_max above workers_min)."""
        return self.workers_max > self.workers_min

    @property
    def starting_workers(self) -> int:
        """How many workers the stack starts with."""
        if not self.autoscaling:
            return self.workers
        return self.workers if "workers" in self.changed() else self.workers_min

    def _check_reload(self) -> None:
        if self.reload_extra_files and not self.reload:
            raise SettingsError("reload_extra_files", self.reload_extra_files[0],
                                "watched only with reload (--reload)")
        if self.reload and self.mode == "direct":
            raise SettingsError("reload", True, "needs mode 'dispatcher': in direct mode a "
                                "reload loses the requests the old workers hold")

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"Settings has no setting {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Settings is immutable; use settings.replace(name=value)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Settings) and other._values == self._values

    def __repr__(self) -> str:
        changed = ", ".join(f"{k}={v!r}" for k, v in self.changed().items())
        return f"Settings({changed})"

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._values.items())

    def replace(self, **changes: Any) -> "Settings":
        """A copy with some values changed (and checked again)."""
        return Settings(**{**self.changed(), **changes})

    def changed(self) -> dict[str, Any]:
        """The values that differ from their defaults."""
        return {s.name: self._values[s.name] for s in SETTINGS
                if self._values[s.name] != s.default}

    def with_defaults_resolved(self, run_dir: str) -> "Settings":
        """Fill the defaults that depend on where the stack runs: run_dir and server_uuid."""
        run_dir = self.run_dir or run_dir
        server_uuid = self.server_uuid or str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"circus-wsgi:{self.bind}:{run_dir}"))
        return self.replace(run_dir=run_dir, server_uuid=server_uuid)

    def to_argv(self, names: Iterable[str] | None = None) -> list[str]:
        """Command-line flags that rebuild these values (defaults and secrets left out:
        a command line is readable by every user of the host).

        ``names`` limits the flags to those settings; the app comes first, bare.
        """
        wanted = set(names) if names is not None else set(_BY_NAME)
        argv: list[str] = []
        if "app" in wanted and self.app:
            argv.append(self.app)
        for name, value in self.changed().items():
            setting = _BY_NAME[name]
            if name == "app" or name not in wanted or setting.secret:
                continue
            if setting.switch:
                argv.append(setting.flag)
            elif setting.repeat:
                for item in value:
                    argv += [setting.flag, _render_item(item)]
            else:
                text = _render(value)  # "--flag=-x": argparse takes a lone "-x" for a flag
                argv += [f"{setting.flag}={text}"] if text.startswith("-") else \
                    [setting.flag, text]
        return argv

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Settings":
        """Load a Python settings file that assigns ``settings = Settings(...)``."""
        if not os.path.isfile(path):
            raise SettingsError("settings", str(path), "file not found")
        try:
            namespace = runpy.run_path(os.path.abspath(path))  # hooks' FILE:NAME is absolute
        except SettingsError:
            raise
        except Exception as error:
            raise SettingsError("settings", str(path),
                                f"the file fails: {type(error).__name__}: {error}") from error
        settings = namespace.get("settings")
        if not isinstance(settings, Settings):
            raise SettingsError("settings", str(path),
                                "the file must assign settings = Settings(...)")
        return settings


def _loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


def _check_security(values: dict[str, Any]) -> None:
    """HTTPS needs both files, and a redirect to it HTTPS; a group is a user's."""
    if bool(values["certfile"]) != bool(values["keyfile"]):
        given, missing = ("certfile", "keyfile") if values["certfile"] else ("keyfile", "certfile")
        raise SettingsError(given, values[given], f"HTTPS needs {missing} too")
    if values["http_redirect"] and not values["certfile"]:
        raise SettingsError("http_redirect", values["http_redirect"],
                            "redirects to HTTPS, which needs certfile and keyfile")
    if values["http_redirect"] and values["http_redirect"] == values["bind"]:
        raise SettingsError("http_redirect", values["http_redirect"], "is bind's address")
    if values["group"] and not values["user"]:
        raise SettingsError("group", values["group"], "needs user too")


def _render_item(item: str | tuple[str, str]) -> str:
    """One item of a repeatable setting as its flag takes it: a path, or KEY=VALUE."""
    return item if isinstance(item, str) else "=".join(item)


def _render(value: Any) -> str:
    if callable(value):
        return reference_of(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
