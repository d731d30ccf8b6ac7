"""The remote-worker settings, ``circus-wsgi keys`` and a worker host's configuration:
what is refused before anything starts, and what ``config --role workers`` writes."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import zmq.auth
from circus.config import get_config

from circus_wsgi import Settings, SettingsError
from circus_wsgi.curve import write_pair
from test_cli_config import CIRCUS_WSGI, ROOT

FRONT = "tcp://192.0.2.1:7700"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CIRCUS_WSGI), *argv], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_keys_writes_a_pair_the_secret_private_and_refuses_to_overwrite(run_dir: Path) -> None:
    keys = run_dir / "keys"
    result = run("keys", str(keys), "--name", "front")
    assert result.returncode == 0, result.stderr
    public, secret = keys / "front.key", keys / "front.key_secret"
    assert f"wrote {public}" in result.stdout and f"wrote {secret}" in result.stdout
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert (keys / "authorized").is_dir()
    public_key, secret_key = zmq.auth.load_certificate(secret)
    assert zmq.auth.load_certificate(public) == (public_key, None) and len(secret_key) == 40
    again = run("keys", str(keys), "--name", "front")
    assert again.returncode == 2 and "exists already" in again.stderr
    assert zmq.auth.load_certificate(secret) == (public_key, secret_key)  # untouched


@pytest.mark.parametrize("values, name, words", [
    ({"remote_workers": FRONT}, "remote_workers", "needs curve_keys"),
    ({"remote_workers": "ipc:///tmp/x"}, "remote_workers", "tcp://"),
    ({"role": "workers"}, "role", "needs connect"),
    ({"connect": FRONT, "insecure_remote_workers": True}, "connect", "give role workers"),
    ({"role": "workers", "connect": FRONT, "insecure_remote_workers": True,
      "metrics": "127.0.0.1:9100"}, "metrics", "runs on the front"),
    ({"role": "workers", "connect": FRONT, "insecure_remote_workers": True,
      "workers_max": 4}, "workers_max", "runs on the front"),
    ({"remote_workers": FRONT, "insecure_remote_workers": True, "mode": "direct"},
     "remote_workers", "need the dispatcher"),
    ({"remote_timeout": 0.1}, "remote_timeout", ""),
], ids=["no-curve", "not-tcp", "no-connect", "connect-without-role", "metrics-on-host",
        "autoscaling-on-host", "direct-mode", "timeout-too-short"])
def test_a_remote_setup_that_cannot_work_is_refused(values: dict, name: str,
                                                    words: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings(app="examples.hello:app", **values)
    assert error.value.name == name and words in str(error.value)


def test_serve_with_a_key_directory_holding_no_key_is_one_line(run_dir: Path) -> None:
    keys = run_dir / "keys"
    (keys / "authorized").mkdir(parents=True)
    result = run("serve", "examples.hello:app", "--remote-workers", "tcp://127.0.0.1:7799",
                 "--curve-keys", str(keys), "--run-dir", str(run_dir / "run"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "must hold exactly one *.key_secret" in result.stderr
    assert not (run_dir / "run").exists()


def test_a_worker_host_needs_the_front_s_key(run_dir: Path) -> None:
    keys = run_dir / "keys"
    write_pair(keys, "host")  # and nothing in authorized/
    result = run("config", "examples.hello:app", "--role", "workers", "--connect", FRONT,
                 "--curve-keys", str(keys), "--out", str(run_dir / "out"))
    assert result.returncode == 2 and "the front's public key" in result.stderr
    assert not (run_dir / "out").exists()


def test_config_role_workers_writes_a_circus_ini_of_workers_alone(run_dir: Path) -> None:
    front_keys, host_keys = run_dir / "front", run_dir / "host"
    front_public, _ = write_pair(front_keys, "front")
    write_pair(host_keys, "host")
    shutil.copy(front_public, host_keys / "authorized")
    out = run_dir / "out"
    result = run("config", "examples.hello:app", "--role", "workers", "--connect", FRONT,
                 "--curve-keys", str(host_keys), "--workers", "3", "--env", "GREETING=hi",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["circus.ini", "run"]
    config = get_config(str(out / "circus.ini"))
    watchers = {watcher["name"]: watcher for watcher in config["watchers"]}
    assert sorted(watchers) == ["circusd-stats", "workers"]  # no mongrel2, no dispatcher
    workers = watchers["workers"]
    assert workers["numprocesses"] == 3 and workers["env"]["GREETING"] == "hi"
    argv = workers["cmd"].split() + workers.get("args", "").split()
    assert argv[argv.index("--connect") + 1] == FRONT
    assert argv[argv.index("--curve-keys") + 1] == str(host_keys)
    assert [plugin["use"] for plugin in config["plugins"]] == [
        "circus_wsgi.flapping.Flapping"]
