"""Settings -> mongrel2's configuration: ``config.sqlite`` and a readable ``mongrel2.conf``.

Both files are rendered from one :class:`Mongrel2Config`, so they always say
the same thing. The database is written with sqlite3 in the schema m2sh 1.12
creates, with no NULLs (mongrel2 refuses to start on one). mongrel2 runs
without chroot and with ``/`` as its working directory, so every path in the
config is absolute, except directory bases, which mongrel2 wants relative and
ending in ``/``.
"""

from __future__ import annotations

import mimetypes
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from . import tls
from .rundir import RunDir
from .settings import Settings

#: mongrel2's superpoll.max_fd (its default is 10240): see the settings written.
SUPERPOLL_MAX_FD = 20480
#: mongrel2 resolves directory bases against its working directory.
MONGREL2_WORKING_DIR = "/"

SCHEMA = """
CREATE TABLE server (id INTEGER PRIMARY KEY, uuid TEXT, access_log TEXT, error_log TEXT,
    chroot TEXT DEFAULT '/var/www', pid_file TEXT, control_port TEXT DEFAULT '',
    default_host TEXT, name TEXT DEFAULT '', bind_addr TEXT DEFAULT "0.0.0.0",
    port INTEGER, use_ssl INTEGER default 0);
CREATE TABLE host (id INTEGER PRIMARY KEY, server_id INTEGER, maintenance BOOLEAN DEFAULT 0,
    name TEXT, matching TEXT);
CREATE TABLE handler (id INTEGER PRIMARY KEY, send_spec TEXT, send_ident TEXT,
    recv_spec TEXT, recv_ident TEXT, raw_payload INTEGER DEFAULT 0,
    protocol TEXT DEFAULT 'json');
CREATE TABLE proxy (id INTEGER PRIMARY KEY, addr TEXT, port INTEGER);
CREATE TABLE directory (id INTEGER PRIMARY KEY, base TEXT, index_file TEXT,
    default_ctype TEXT, cache_ttl INTEGER DEFAULT 0);
CREATE TABLE route (id INTEGER PRIMARY KEY, path TEXT, reversed BOOLEAN DEFAULT 0,
    host_id INTEGER, target_id INTEGER, target_type TEXT);
CREATE TABLE setting (id INTEGER PRIMARY KEY, key TEXT, value TEXT);
CREATE TABLE statistic (id SERIAL, other_type TEXT, other_id INTEGER, name TEXT, sum REAL,
    sumsq REAL, n INTEGER, min REAL, max REAL, mean REAL, sd REAL,
    primary key (other_type, other_id, name));
CREATE TABLE mimetype (id INTEGER PRIMARY KEY, mimetype TEXT, extension TEXT);
CREATE TABLE filter (id INTEGER PRIMARY KEY, server_id INTEGER, name TEXT, settings TEXT);
CREATE TABLE xrequest (id INTEGER PRIMARY KEY, server_id INTEGER, name TEXT, settings TEXT);
CREATE TABLE log(id INTEGER PRIMARY KEY, who TEXT, what TEXT, location TEXT,
    happened_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP, how TEXT, why TEXT);
"""

#: Content types of the files mongrel2 serves from static directories, by extension:
#: Python's built-in table (the same on every machine, unlike /etc/mime.types) plus the
#: web types it lacks. m2sh would load its own list of ~850; this one covers the web.
MIMETYPES: dict[str, str] = {
    **mimetypes.MimeTypes(filenames=()).types_map[True],
    ".webp": "image/webp", ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf",
    ".otf": "font/otf", ".map": "application/json",
}


@dataclass(frozen=True)
class Handler:
    send_spec: str
    send_ident: str
    recv_spec: str
    recv_ident: str = ""
    protocol: str = "tnetstring"


@dataclass(frozen=True)
class Directory:
    base: str
    index_file: str = "index.html"
    default_ctype: str = "application/octet-stream"


@dataclass(frozen=True)
class Mongrel2Config:
    """Everything mongrel2 is told, independent of the file format."""

    uuid: str
    bind_addr: str
    port: int
    access_log: str
    error_log: str
    pid_file: str
    control_port: str
    handler: Handler
    handler_routes: tuple[str, ...]
    directory_routes: tuple[tuple[str, Directory], ...]
    settings: dict[str, str] = field(default_factory=dict)
    use_ssl: bool = False

    @property
    def host_name(self) -> str:
        return "localhost"

    @property
    def name(self) -> str:
        return "circus-wsgi"


def directory_base(path: str) -> str:
    """A directory as mongrel2 wants it: relative to its working dir, ending in ``/``."""
    relative = os.path.relpath(os.path.abspath(path), MONGREL2_WORKING_DIR)
    return relative.rstrip("/") + "/"


def require_resolved(settings: Settings) -> None:
    """The generators need run_dir and server_uuid filled in, and run_dir absolute."""
    if not (settings.server_uuid and os.path.isabs(settings.run_dir)):
        raise ValueError("resolve the settings first: settings.with_defaults_resolved(run_dir)")


def mongrel2_config(settings: Settings) -> Mongrel2Config:
    """What mongrel2 must be told for these resolved settings."""
    require_resolved(settings)
    run = RunDir(Path(settings.run_dir))
    host, _, port = settings.bind.rpartition(":")
    flow_control = settings.flow_control and settings.mode == "dispatcher"
    app_prefixes = ("/",) + tuple(prefix for prefix, _ in settings.mounts)
    return Mongrel2Config(
        uuid=settings.server_uuid,
        bind_addr="127.0.0.1" if host == "localhost" else host,
        port=int(port),
        access_log=str(run.mongrel2_access_log),
        error_log="/dev/stderr",
        pid_file=str(run.mongrel2_pid_file),
        control_port=run.mongrel2_control,
        handler=Handler(
            send_spec=settings.send_spec or run.mongrel2_send,
            send_ident=settings.server_uuid,
            recv_spec=settings.recv_spec or run.mongrel2_recv),
        handler_routes=app_prefixes,
        directory_routes=tuple((prefix if prefix.endswith("/") else prefix + "/",
                                Directory(directory_base(path)))
                               for prefix, path in settings.static),
        settings={
            "server.daemonize": "0",
            # mongrel2's access log records 200 and the request's length for every
            # handler route; the workers write the true one. Off: +7 % req/s measured.
            "disable.access_logging": "1",
            # Connections waiting for a response are in mongrel2's poll ("hot") set,
            # which holds max_fd / hot_dividend of them (10240 / 4 by default): past 2,560
            # it dropped connections. Half of twice the default: 10,240.
            "superpoll.max_fd": str(SUPERPOLL_MAX_FD),
            "superpoll.hot_dividend": "2",
            "limits.content_length": str(settings.content_length),
            "limits.buffer_size": str(settings.buffer_size),
            "limits.min_ping": str(settings.min_ping),
            "download.flow_control": "1" if flow_control else "0",
            "upload.temp_store": run.upload_template,
            "upload.temp_store_mode": "0600",
            "control_port": run.mongrel2_control,
            # X-Forwarded-For as the client sent it: the workers decide whom to believe
            # (forwarded_allow_ips); mongrel2 would replace it with the peer's address.
            "no_clobber_xff": "1",
            **({"certdir": tls.certdir_setting(run), "ssl_ciphers": settings.ciphers}
               if settings.certfile else {}),
        },
        use_ssl=bool(settings.certfile),
    )


def write_sqlite(config: Mongrel2Config, path: Path) -> Path:
    """Write ``config`` as a fresh mongrel2 config database at ``path``."""
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
        server = db.execute(
            "INSERT INTO server (uuid, access_log, error_log, chroot, pid_file, control_port,"
            " default_host, name, bind_addr, port, use_ssl) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (config.uuid, config.access_log, config.error_log, "", config.pid_file,
             config.control_port, config.host_name, config.name, config.bind_addr,
             config.port, int(config.use_ssl))).lastrowid
        host = db.execute(
            "INSERT INTO host (server_id, maintenance, name, matching) VALUES (?,0,?,?)",
            (server, config.host_name, config.host_name)).lastrowid
        h = config.handler
        handler = db.execute(
            "INSERT INTO handler (send_spec, send_ident, recv_spec, recv_ident, raw_payload,"
            " protocol) VALUES (?,?,?,?,0,?)",
            (h.send_spec, h.send_ident, h.recv_spec, h.recv_ident, h.protocol)).lastrowid
        for prefix in config.handler_routes:
            db.execute("INSERT INTO route (path, reversed, host_id, target_id, target_type)"
                       " VALUES (?,0,?,?,'handler')", (prefix, host, handler))
        for prefix, directory in config.directory_routes:
            target = db.execute(
                "INSERT INTO directory (base, index_file, default_ctype, cache_ttl)"
                " VALUES (?,?,?,0)",
                (directory.base, directory.index_file, directory.default_ctype)).lastrowid
            db.execute("INSERT INTO route (path, reversed, host_id, target_id, target_type)"
                       " VALUES (?,0,?,?,'dir')", (prefix, host, target))
        db.executemany("INSERT INTO setting (key, value) VALUES (?,?)",
                       sorted(config.settings.items()))
        db.executemany("INSERT INTO mimetype (mimetype, extension) VALUES (?,?)",
                       [(mime, ext) for ext, mime in MIMETYPES.items()])
    db.close()
    return path


def _quote(value: str) -> str:
    """A string literal of m2sh's .conf language: it has quotes but no escapes."""
    for quote in "'\"":
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(f"mongrel2.conf cannot hold {value!r}: it has both kinds of quote")


def _block(opening: str, items: list[str], closing: str) -> list[str]:
    """Lines of a call, dict or list: m2sh refuses a comma after the last item."""
    return [opening, *(f"    {item}," for item in items[:-1]), f"    {items[-1]}", closing]


def render_conf(config: Mongrel2Config) -> str:
    """The same configuration in m2sh's ``.conf`` language, for people to read.

    ``m2sh load -config mongrel2.conf -db X.sqlite`` rebuilds config.sqlite from it,
    except the mimetype table, which m2sh fills with its own list.
    """
    h = config.handler
    lines = ["# Written by circus-wsgi from its Settings; config.sqlite holds the same.",
             f"# mongrel2 runs in {MONGREL2_WORKING_DIR}: directory bases are relative to it."]
    lines += _block("app = Handler(", [
        f"send_spec={_quote(h.send_spec)}", f"send_ident={_quote(h.send_ident)}",
        f"recv_spec={_quote(h.recv_spec)}", f"recv_ident={_quote(h.recv_ident)}",
        f"protocol={_quote(h.protocol)}"], ")")
    routes = [f"{_quote(prefix)}: app" for prefix in config.handler_routes]
    for number, (prefix, directory) in enumerate(config.directory_routes):
        lines += _block(f"static{number} = Dir(", [
            f"base={_quote(directory.base)}", f"index_file={_quote(directory.index_file)}",
            f"default_ctype={_quote(directory.default_ctype)}"], ")")
        routes.append(f"{_quote(prefix)}: static{number}")
    route_map = "{\n" + ",\n".join(f"        {route}" for route in routes) + "\n    }"
    lines += _block("main = Server(", [
        f"uuid={_quote(config.uuid)}",
        f"access_log={_quote(config.access_log)}",
        f"error_log={_quote(config.error_log)}",
        "chroot=''",
        f"pid_file={_quote(config.pid_file)}",
        f"control_port={_quote(config.control_port)}",
        f"default_host={_quote(config.host_name)}",
        f"name={_quote(config.name)}",
        f"bind_addr={_quote(config.bind_addr)}",
        f"port={config.port}",
        *(["use_ssl=1"] if config.use_ssl else []),
        f"hosts=[Host(name={_quote(config.host_name)}, routes={route_map})]"], ")")
    lines += _block("settings = {", [f"{_quote(key)}: {_quote(value)}"
                                     for key, value in sorted(config.settings.items())], "}")
    lines += ["servers = [main]", ""]
    return "\n".join(lines)


def write_mongrel2_config(settings: Settings, directory: Path) -> tuple[Path, Path]:
    """Write ``config.sqlite`` and ``mongrel2.conf`` into ``directory``; return both paths."""
    config = mongrel2_config(settings)
    conf_text = render_conf(config)  # first: it may refuse a value
    sqlite_path = write_sqlite(config, directory / "config.sqlite")
    conf_path = directory / "mongrel2.conf"
    conf_path.write_text(conf_text)
    return sqlite_path, conf_path
