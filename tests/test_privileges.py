"""``--user`` and ``--group``: once serving, only circusd (and serve above it) runs as root;
mongrel2, the dispatcher, the workers, circusd-stats and the flapping plugin run as
``nobody``, the app sees that user, the run dir and its sockets are private to it, and a
port under 1024 still works (mongrel2 keeps CAP_NET_BIND_SERVICE and nothing else).

The stack runs from :func:`foreign_user.runtime`, an interpreter ``nobody`` can read.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from circus_wsgi.settings import Settings, SettingsError
from foreign_user import Runtime, runtime
from harness import free_port, wait_for
from test_serve import (APP, CIRCUS_WSGI, STOP_DEADLINE, Serve, assert_nothing_left, get,
                        preflight, scratch, stack_processes, start_serve)

NOBODY = 65534
CAP_NET_BIND_SERVICE = 1 << 10


@pytest.fixture(scope="module")
def foreign() -> Iterator[Runtime]:
    with runtime() as built:
        yield built


def privileged_port() -> int:
    """A port under 1024 nobody listens on."""
    return free_port(600, 1000)


def serve_as_nobody(directory: Path, foreign: Runtime, *flags: str, port: int | None = None
                    ) -> Serve:
    return start_serve(directory, "--user", "nobody", "--chdir", str(foreign.apps), *flags,
                       argv0=foreign.command(), env=foreign.env, port=port)


@pytest.fixture(scope="module")
def as_nobody(foreign: Runtime) -> Iterator[Serve]:
    """serve --user nobody on a port under 1024, 2 workers."""
    with scratch() as directory:
        directory.chmod(0o755)  # the run dir in it is nobody's
        served = serve_as_nobody(directory, foreign, "--workers", "2", port=privileged_port())
        try:
            yield served
        finally:
            served.process.stop(STOP_DEADLINE)


def _ids(process: psutil.Process) -> set[int]:
    return set(process.uids()) | set(process.gids())


def _capabilities(pid: int, kind: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {kind} for {pid}")


def test_only_serve_and_circusd_run_as_root(as_nobody: Serve) -> None:
    [circusd] = [p for p in psutil.Process(as_nobody.process.pid).children()
                 if "circus.circusd" in p.cmdline()]
    processes = {p.pid: p for p in stack_processes(as_nobody.directory)}
    others = {pid: p for pid, p in processes.items()
              if pid not in (as_nobody.process.pid, circusd.pid)}
    assert _ids(psutil.Process(as_nobody.process.pid)) == _ids(circusd) == {0}
    assert {pid: _ids(p) for pid, p in others.items()} == {pid: {NOBODY} for pid in others}
    kinds = {next((k for k in ("mongrel2", "dispatcher", "worker", "stats", "plugins")
                   if k in " ".join(p.cmdline())), p.name()) for p in others.values()}
    assert kinds == {"mongrel2", "dispatcher", "worker", "stats", "plugins"}
    assert len(others) == 6  # and two workers


def test_the_app_sees_nobody(as_nobody: Serve) -> None:
    reply = as_nobody.get("/whoami")
    assert reply.status == 200 and reply.body == f"{NOBODY} {NOBODY} [{NOBODY}]".encode()


def test_a_port_under_1024_is_served_by_a_mongrel2_keeping_only_that_right(
        as_nobody: Serve) -> None:
    assert as_nobody.port < 1024 and as_nobody.get("/").status == 200
    [mongrel2] = as_nobody.pids("mongrel2")
    assert psutil.Process(mongrel2).name() == "mongrel2"
    assert _capabilities(mongrel2, "CapEff") == CAP_NET_BIND_SERVICE
    for pid in as_nobody.pids("dispatcher") | as_nobody.pids("workers"):
        assert _capabilities(pid, "CapEff") == 0 and _capabilities(pid, "CapPrm") == 0


def test_the_run_dir_and_its_sockets_are_nobodys_alone(as_nobody: Serve) -> None:
    run_dir = as_nobody.directory / "run"
    for directory in (run_dir, run_dir / "uploads"):
        info = directory.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY, NOBODY, 0o700)
    sockets = [path for path in run_dir.iterdir() if path.is_socket()]
    assert {"circus.sock", "circus-pubsub.sock", "dispatcher.sock", "m2-requests.sock"} <= {
        path.name for path in sockets}
    assert {path.name: path.stat().st_uid for path in sockets} == {
        path.name: NOBODY for path in sockets}
    ini = (run_dir / "circus.ini").stat()
    assert ini.st_uid == 0 and stat.S_IMODE(ini.st_mode) == 0o600


def test_circusctl_and_the_stats_reach_circusd(as_nobody: Serve) -> None:
    """circusd-stats, as nobody, talks to root's circusd through the sockets handed over."""
    assert len(as_nobody.pids("workers")) == 2
    stats = as_nobody.circusctl("stats", "workers")
    assert all(str(pid) in stats for pid in as_nobody.pids("workers"))
    assert as_nobody.circusctl("status", "circusd-stats") == "active"


def test_reload_keeps_the_new_workers_as_nobody(as_nobody: Serve) -> None:
    before = as_nobody.pids("workers")
    as_nobody.circusctl("reload", "workers")
    wait_for(lambda: len(as_nobody.pids("workers")) == 2 and not as_nobody.pids("workers")
             & before, 20, 0.1, "two new workers")
    for pid in as_nobody.pids("workers"):
        assert _ids(psutil.Process(pid)) == {NOBODY}
    assert as_nobody.get("/whoami").body.startswith(f"{NOBODY} ".encode())


def test_kill_9_of_circusd_still_ends_the_processes_that_changed_user(foreign: Runtime
                                                                        ) -> None:
    with scratch() as directory:
        directory.chmod(0o755)
        served = serve_as_nobody(directory, foreign, "--workers", "1")
        try:
            [circusd] = [p for p in psutil.Process(served.process.pid).children()
                         if "circus.circusd" in p.cmdline()]
            pids = served.pids("mongrel2") | served.pids("dispatcher") | served.pids("workers")
            circusd.kill()
            assert served.process.popen.wait(15) == 1
            assert not any(psutil.pid_exists(pid) for pid in pids)
            assert_nothing_left(directory, within=0)
        finally:
            served.process.stop(STOP_DEADLINE)


# -- refused before anything starts


@pytest.mark.parametrize("flags, message", [
    (("--user", "no-such-user"),
     "setting 'user': invalid value 'no-such-user': no such user on this machine"),
    (("--user", "nobody", "--group", "no-such-group"),
     "setting 'group': invalid value 'no-such-group': no such group on this machine"),
    (("--group", "nogroup"), "setting 'group': invalid value 'nogroup': needs user too"),
], ids=["user", "group", "group-alone"])
def test_a_user_or_group_that_does_not_exist_is_one_line(flags: tuple, message: str) -> None:
    with scratch() as directory:
        result = preflight(directory, APP, *flags)
        assert result.stderr == f"circus-wsgi: error: {message}\n"
        config = subprocess.run([CIRCUS_WSGI, "config", APP, "--out", str(directory / "out"),
                                 *flags], capture_output=True, text=True, timeout=60)
        assert (config.returncode, config.stderr) == (2, result.stderr)
        assert not (directory / "out").exists()


def test_numeric_ids_are_kept_as_names() -> None:
    assert (Settings(user=NOBODY, group=str(NOBODY)).user, Settings(user="nobody").group) == (
        "nobody", "")
    with pytest.raises(SettingsError, match="no such user"):
        Settings(user=2**40)


def test_only_root_may_switch_users(foreign: Runtime) -> None:
    with scratch() as directory:
        directory.chmod(0o777)
        result = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups",
             *foreign.command("config", "serve_apps:app", "--chdir", str(foreign.apps),
                              "--no-check-app", "--out", str(directory / "out"),
                              "--user", "root")],
            env=foreign.env, capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (
            2, "circus-wsgi: error: setting 'user': invalid value 'root': only root can run "
               "the stack as another user\n")


def test_an_app_the_user_cannot_reach_is_refused_by_the_import_check(foreign: Runtime
                                                                       ) -> None:
    with scratch() as directory:
        private = directory / "private"
        private.mkdir(mode=0o700)
        (private / "serve_apps.py").write_text((foreign.apps / "serve_apps.py").read_text())
        result = subprocess.run(
            foreign.command("serve", "serve_apps:app", "--chdir", str(private), "--user",
                            "nobody", "--bind", f"127.0.0.1:{privileged_port()}"),
            env=foreign.env, capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (
            2, f"circus-wsgi: error: setting 'chdir': cannot enter {private}: "
               "Permission denied\n")
        assert not stack_processes(directory)


def test_config_for_nobody_runs_under_plain_circusd(foreign: Runtime) -> None:
    """The files of ``config --user nobody``, run by root's circusd: the same users."""
    with scratch() as directory:
        directory.chmod(0o755)
        out, port = directory / "out", privileged_port()
        subprocess.run(foreign.command("config", "serve_apps:app", "--chdir", str(foreign.apps),
                                       "--user", "nobody", "--workers", "1", "--bind",
                                       f"127.0.0.1:{port}", "--out", str(out)),
                       env=foreign.env, check=True, capture_output=True, timeout=60)
        circusd = subprocess.Popen([str(foreign.python), "-m", "circus.circusd",
                                    str(out / "circus.ini")], env=foreign.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: _whoami(port), 20, 0.1, "the stack to answer")
            assert _whoami(port) == f"{NOBODY} {NOBODY} [{NOBODY}]"
            assert {p.uids().real for p in stack_processes(out)} == {0, NOBODY}
        finally:
            circusd.terminate()
            circusd.wait(45)
        assert_nothing_left(out, within=5)


def _whoami(port: int) -> str:
    try:
        reply = get(port, "/whoami", timeout=2)
    except OSError:
        return ""
    return reply.body.decode() if reply.status == 200 else ""



def test_a_run_dir_the_user_cannot_reach_is_one_line(foreign: Runtime) -> None:
    with scratch() as directory:  # 0700, root's: nobody cannot pass through it
        result = subprocess.run(
            foreign.command("serve", "serve_apps:app", "--chdir", str(foreign.apps), "--user",
                            "nobody", "--bind", f"127.0.0.1:{privileged_port()}", "--run-dir",
                            str(directory / "run")),
            env=foreign.env, capture_output=True, text=True, timeout=60)
        assert (result.returncode, result.stderr) == (
            2, f"circus-wsgi: error: setting 'user': invalid value 'nobody': cannot reach "
               f"{directory / 'run'}: every directory above it must let nobody through\n")
        assert not stack_processes(directory)
