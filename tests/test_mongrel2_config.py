"""Settings -> config.sqlite and mongrel2.conf, checked against what m2sh itself makes.

m2sh (mongrel2 1.12's own tool) loads the generated mongrel2.conf into a second
database: both must have the same schema and say the same thing. m2sh exits 0
even when it refuses a file, so its output and result are checked instead.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from circus_wsgi.mongrel2 import (
    MIMETYPES, Directory, directory_base, mongrel2_config, render_conf, write_mongrel2_config)
from circus_wsgi.rundir import RunDir
from circus_wsgi.settings import Settings
from harness import m2sh

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def resolved(tmp: Path, **values: object) -> Settings:
    return Settings(app="examples.hello:app", **values).with_defaults_resolved(str(tmp / "run"))


def m2sh_load(conf: Path, db: Path) -> None:
    result = m2sh("load", "-config", str(conf), "-db", str(db))
    assert "ERROR" not in result.stdout + result.stderr, result.stdout + result.stderr


def schema(db_path: Path) -> dict[str, list[tuple]]:
    """Each table's columns: name, type, not-null, default, primary-key position."""
    with sqlite3.connect(db_path) as db:
        tables = [name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        assert db.execute("SELECT count(*) FROM sqlite_master WHERE type != 'table'"
                          " AND name NOT LIKE 'sqlite_autoindex%'").fetchone() == (0,)
        return {table: [row[1:] for row in db.execute(f"PRAGMA table_info({table})")]
                for table in tables}


def content(db_path: Path) -> dict[str, object]:
    """What a config database says, independent of row ids and row order."""
    with sqlite3.connect(db_path) as db:
        def rows(sql: str) -> list[tuple]:
            return sorted(db.execute(sql).fetchall())
        return {
            "server": rows("SELECT uuid, access_log, error_log, chroot, pid_file, control_port,"
                           " default_host, name, bind_addr, port, use_ssl FROM server"),
            "host": rows("SELECT s.uuid, h.name, h.matching, h.maintenance"
                         " FROM host h JOIN server s ON h.server_id = s.id"),
            "handler_routes": rows(
                "SELECT r.path, r.reversed, h.name, x.send_spec, x.send_ident, x.recv_spec,"
                " x.recv_ident, x.raw_payload, x.protocol FROM route r"
                " JOIN host h ON r.host_id = h.id JOIN handler x ON r.target_id = x.id"
                " WHERE r.target_type = 'handler'"),
            "dir_routes": rows(
                "SELECT r.path, r.reversed, h.name, d.base, d.index_file, d.default_ctype,"
                " d.cache_ttl FROM route r JOIN host h ON r.host_id = h.id"
                " JOIN directory d ON r.target_id = d.id WHERE r.target_type = 'dir'"),
            "other_routes": rows("SELECT path FROM route WHERE target_type"
                                 " NOT IN ('handler', 'dir')"),
            "setting": rows("SELECT key, value FROM setting"),
            "proxy": rows("SELECT * FROM proxy"),
        }


@pytest.fixture(scope="module")
def generated() -> Iterator[tuple[Settings, Path, Path]]:
    """A config with mounts and two static dirs (one with a quote in its name), written by
    circus-wsgi, and the same .conf loaded by m2sh: (settings, ours, m2sh's)."""
    with tempfile.TemporaryDirectory(prefix="cw-test-", dir="/tmp") as name:
        tmp = Path(name)
        quoted = tmp / "it's public"
        quoted.mkdir()
        settings = resolved(tmp, mounts=["/api=pkg.api:app"], content_length=4096,
                            static={"/static": str(EXAMPLES / "static"), "/files/": str(quoted)})
        ours, conf = write_mongrel2_config(settings, tmp)
        theirs = tmp / "m2sh.sqlite"
        m2sh_load(conf, theirs)
        yield settings, ours, theirs


def test_schema_is_what_m2sh_makes(generated: tuple[Settings, Path, Path]) -> None:
    _, ours, theirs = generated
    assert schema(ours) == schema(theirs)
    assert {"server", "host", "handler", "proxy", "directory", "route", "setting",
            "statistic", "mimetype", "filter", "xrequest", "log"} == set(schema(ours))


def test_m2sh_reads_the_same_config_from_mongrel2_conf(
        generated: tuple[Settings, Path, Path]) -> None:
    _, ours, theirs = generated
    assert content(ours) == content(theirs)


def test_no_null_in_any_column(generated: tuple[Settings, Path, Path]) -> None:
    _, ours, _ = generated
    with sqlite3.connect(ours) as db:
        for table, columns in schema(ours).items():
            for name, *_ in columns:
                nulls = db.execute(f"SELECT count(*) FROM {table} WHERE {name} IS NULL")
                assert nulls.fetchone() == (0,), f"{table}.{name}"
        for table in ("server", "host", "handler", "route", "directory", "setting",
                      "mimetype"):
            assert db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0, table


def test_database_says_what_the_settings_say(generated: tuple[Settings, Path, Path]) -> None:
    settings, ours, _ = generated
    run = RunDir(Path(settings.run_dir))
    said = content(ours)
    assert said["server"] == [(
        settings.server_uuid, str(run.mongrel2_access_log), "/dev/stderr", "",
        str(run.mongrel2_pid_file), run.mongrel2_control, "localhost", "circus-wsgi",
        "127.0.0.1", 8000, 0)]
    handler = ("localhost", run.mongrel2_send, settings.server_uuid, run.mongrel2_recv, "",
               0, "tnetstring")
    assert said["handler_routes"] == [("/", 0, *handler), ("/api", 0, *handler)]
    static, files = (directory_base(path) for _, path in settings.static)
    assert said["dir_routes"] == [
        ("/files/", 0, "localhost", files, "index.html", "application/octet-stream", 0),
        ("/static/", 0, "localhost", static, "index.html", "application/octet-stream", 0)]
    assert dict(said["setting"]) == {
        "server.daemonize": "0", "disable.access_logging": "1",
        "superpoll.max_fd": "20480", "superpoll.hot_dividend": "2",
        "limits.content_length": "4096",
        "limits.buffer_size": "16384", "limits.min_ping": "120",
        "download.flow_control": "1", "upload.temp_store": str(run.uploads / "upload.XXXXXX"),
        "upload.temp_store_mode": "0600", "control_port": run.mongrel2_control,
        "no_clobber_xff": "1"}


def test_web_content_types_are_known(generated: tuple[Settings, Path, Path]) -> None:
    _, ours, _ = generated
    with sqlite3.connect(ours) as db:
        types = dict(db.execute("SELECT extension, mimetype FROM mimetype"))
    for extension in (".html", ".css", ".js", ".json", ".svg", ".png", ".jpg", ".woff2",
                      ".wasm", ".txt"):
        assert types[extension] == MIMETYPES[extension]
    assert types[".html"] == "text/html" and types[".woff2"] == "font/woff2"


def test_settings_change_the_limits_and_specs(run_dir: Path) -> None:
    config = mongrel2_config(resolved(
        run_dir, bind="localhost:9000", buffer_size=65536, min_ping=0, flow_control=False,
        mode="direct", send_spec="tcp://127.0.0.1:9997", recv_spec="tcp://127.0.0.1:9996"))
    assert (config.bind_addr, config.port) == ("127.0.0.1", 9000)
    assert config.settings["limits.buffer_size"] == "65536"
    assert config.settings["limits.min_ping"] == "0"
    assert config.settings["download.flow_control"] == "0"
    assert (config.handler.send_spec, config.handler.recv_spec) == (
        "tcp://127.0.0.1:9997", "tcp://127.0.0.1:9996")
    assert mongrel2_config(resolved(run_dir, bind="0.0.0.0:80")).bind_addr == "0.0.0.0"


def test_flow_control_is_off_in_direct_mode(run_dir: Path) -> None:
    direct = mongrel2_config(resolved(run_dir, mode="direct", flow_control=True))
    assert direct.settings["download.flow_control"] == "0"
    dispatched = mongrel2_config(resolved(run_dir, flow_control=True))
    assert dispatched.settings["download.flow_control"] == "1"


def test_every_path_mongrel2_writes_is_in_the_run_dir(run_dir: Path) -> None:
    config = mongrel2_config(resolved(run_dir))
    run = str(run_dir / "run") + "/"
    for path in (config.access_log, config.pid_file, config.settings["upload.temp_store"],
                 config.control_port.removeprefix("ipc://"),
                 config.handler.send_spec.removeprefix("ipc://"),
                 config.handler.recv_spec.removeprefix("ipc://")):
        assert path.startswith(run), path


def test_directory_base_is_relative_to_mongrels_working_dir_and_ends_in_slash() -> None:
    assert directory_base("/srv/www") == "srv/www/"
    assert directory_base("/srv/www/") == "srv/www/"


def test_unresolved_settings_are_refused(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="with_defaults_resolved"):
        mongrel2_config(Settings(app="a:b"))


def test_a_value_with_both_quotes_cannot_go_into_mongrel2_conf(run_dir: Path) -> None:
    config = mongrel2_config(resolved(run_dir))
    both = dataclasses.replace(config, directory_routes=(("/x/", Directory("a'b\"c/")),))
    with pytest.raises(ValueError, match="both kinds of quote"):
        render_conf(both)


def test_writing_again_replaces_the_database(run_dir: Path) -> None:
    write_mongrel2_config(resolved(run_dir, mounts=["/old=a:b"]), run_dir)
    sqlite_path, _ = write_mongrel2_config(resolved(run_dir), run_dir)
    assert [path for path, *_ in content(sqlite_path)["handler_routes"]] == ["/"]
