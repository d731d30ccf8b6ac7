"""Benchmark circus-wsgi against Gunicorn, Granian, Waitress and mongrel2's own ceiling.

Strategy: every server runs the same application (:mod:`benchmarks.apps`) with
two worker processes, on 127.0.0.1, on a 2-core box shared with the load
generator. Each round starts every server in turn, loads it with every
scenario, and stops it (A B C ... A B C ...), so slow drifts of the machine
touch every server alike; the report takes the median over rounds. Load comes
from wrk (50 connections, keep-alive or ``Connection: close``; 1,000 and 5,000
for the many-connections shape), from :mod:`benchmarks.slowmix` for the slow
mix (at 80 req/s, and at half the server's hello rate), and from
:mod:`benchmarks.slowclients` beside wrk for the slow-clients shape; the
defaults shape is each server started as its README starts it, and with its
access log on (the VARIANTS servers). Around each load run the CPU time of
every process of the server (psutil, grouped by role: mongrel2, dispatcher,
workers, manager) and of the load generator (its rusage) is taken, so the
report shows where the CPU goes. Everything is bounded: each load run has a
deadline, each server is stopped with SIGTERM and, past a deadline, SIGKILL of
its whole process tree; nothing is left running.

    .venv/bin/python benchmarks/run.py            full run, writes docs/benchmarks.rst + .pngs
    .venv/bin/python benchmarks/run.py --quick    hello only, one round, under 3 minutes

Results (JSON, server logs, profiles) go to benchmarks/results/ (git-ignored).
``--report RESULTS.json`` rewrites the document from an earlier run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
BIN = Path(sys.executable).parent
RESULTS = BENCH / "results"
WRK_SCRIPT = BENCH / "wrk" / "bench.lua"
APP = "benchmarks.apps:app"
HOST = "127.0.0.1"
#: Ports below the ephemeral range (32768-60999), where collisions were seen.
PORTS = range(18200, 32000)
CONNECTIONS = 50
#: Directories put before the checkout on the servers' PYTHONPATH (--package-dir).
PACKAGE_PATH: list[str] = []
#: More arguments for every ``circus-wsgi serve`` (--serve-args).
SERVE_ARGS: list[str] = []
#: mongrel2 settings added to the *-config variants' config.sqlite (--mongrel2-setting).
MONGREL2_SETTINGS: dict[str, str] = {}
#: Before each load run, wait for the machine's other work to fall under this share
#: of a core (sampled over QUIET_SAMPLE seconds), for at most --quiet-wait seconds.
QUIET_THRESHOLD = 0.25
QUIET_SAMPLE = 0.5
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


# ---------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    path: str = "/"
    method: str = "GET"
    body_size: int = 0
    close: bool = False
    #: "wrk"; "slowmix", whose table ranks the fast requests' p99; or "slowclients": wrk
    #: beside benchmarks/slowclients.py.
    client: str = "wrk"
    connections: int = CONNECTIONS
    #: The scenario whose result of the same round, on the same server start, this one
    #: is read against (and, for a slow mix, takes its rate from).
    baseline: str = ""
    #: The slow mix's rate as a share of the baseline's req/s (0: the fixed SLOWMIX_RATE).
    rate_share: float = 0.0


#: The slow mix's fixed rate: the slow requests keep one of two workers asleep on average.
SLOWMIX_RATE = 80.0
#: The slow mix a server answers at most per second and thread: one request in
#: SLOW_EVERY holds a thread for SLOW_SECONDS.
SLOW_EVERY, SLOW_SECONDS = 100, 1.0
#: Granian's WSGI threads with 2 workers and its defaults: 256 blocking threads a worker
#: (half its backpressure, backlog 1024 / 2 workers).
GRANIAN_CONCURRENCY = 512
#: The slow-clients load: slowloris clients and slow readers (benchmarks/slowclients.py),
#: started this long before the fast load, so they are all there when it starts.
SLOWLORIS_CLIENTS, SLOW_READERS, SLOW_READ_RATE = 200, 50, 100 * 1024
SLOW_CLIENTS_LEAD = 2.0
#: wrk's threads for the many-connections scenarios (at least).
MANY_CONNECTIONS_THREADS = 2

SCENARIOS = (
    Scenario("hello", "hello (13 B), keep-alive"),
    Scenario("hello-close", "hello (13 B), Connection: close", close=True),
    Scenario("json", "JSON (1 KB), keep-alive", "/json"),
    Scenario("big", "100 KB response, keep-alive", "/big"),
    Scenario("upload", "1 MB POST echoed back, keep-alive", "/echo", "POST", 1 << 20),
    Scenario("slowmix", "1 % of requests sleep 1 s (80 req/s, open loop)", client="slowmix"),
    Scenario("hello-1k", "hello, 1,000 keep-alive connections", connections=1000),
    Scenario("hello-5k", "hello, 5,000 keep-alive connections", connections=5000),
    Scenario("slowclients", f"hello beside {SLOWLORIS_CLIENTS} slowloris clients and "
             f"{SLOW_READERS} slow readers", client="slowclients", baseline="hello"),
    Scenario("slowmix-half", "1 % of requests sleep 1 s, at half the server's capacity",
             client="slowmix", baseline="hello", rate_share=0.5),
)
QUICK_SCENARIOS = ("hello", "hello-close")
#: The scenarios of each of issue 20's load shapes (the defaults shape is servers: see
#: VARIANTS), each with its own section in the document.
SHAPES = {"connections": ("hello-1k", "hello-5k"), "slowclients": ("slowclients",),
          "slowmix-half": ("slowmix-half",)}


# ---------------------------------------------------------------------------
# Servers


@dataclass
class Launch:
    """How one server instance is started: its argv, its working dir, what to remove after."""

    argv: list[str]
    cwd: Path = ROOT
    cleanup: Callable[[], None] | None = None
    namespace: str = ""  # the network namespace its port is in: clients run there
    package_dir: str = ""  # where its circus_wsgi comes from, before --package-dir's
    ready: Callable[[], bool] | None = None  # more to wait for than a 200 (and workers)


@dataclass(frozen=True)
class Server:
    name: str
    title: str
    launch: Callable[[int], Launch]  # port -> how to start it
    group: Callable[[psutil.Process, int], str]  # (process, root pid) -> role
    scenarios: tuple[str, ...] | None = None  # None: all
    paths: dict[str, str] = field(default_factory=dict)  # scenario's path -> its own
    stop_signals: tuple[int, ...] = (signal.SIGTERM,)
    python_side: tuple[str, ...] = ("workers",)  # roles whose CPU is the Python side
    note: str = ""  # how it runs, for the document, when its argv would not say it
    #: Requests it runs at once (processes x threads): what bounds its rate of the slow mix.
    concurrency: int = 2
    #: For the defaults shape: the server this one is a variant of, and which
    #: ("defaults": as its README starts it; "accesslog": that with its access log on).
    variant_of: str = ""
    variant: str = ""
    access_log: str = ""  # a variant's access log, for the document


def _circus_group(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "manager"
    cmdline = " ".join(proc.cmdline())
    if "circus_wsgi dispatcher" in cmdline:
        return "dispatcher"
    if "circus_wsgi worker" in cmdline or "benchmarks.nullhandler " in cmdline:
        return "workers"  # the null handlers' processes: see nullhandler.py
    if proc.name() == "mongrel2":
        return "mongrel2"
    return "manager"  # serve, circusd, circusd-stats, the flapping plugin


def _master_and_workers(proc: psutil.Process, root: int) -> str:
    if proc.pid == root or "resource_tracker" in " ".join(proc.cmdline()):
        return "manager"
    return "workers"


def _single(role: str) -> Callable[[psutil.Process, int], str]:
    return lambda proc, root: role


def circus_defaults(port: int) -> Launch:
    """``circus-wsgi serve`` as the README starts it: its access log on, to stderr."""
    return Launch([str(BIN / "circus-wsgi"), "serve", APP, "--bind", f"{HOST}:{port}",
                   *SERVE_ARGS])


def circus_wsgi(threads: int, direct: bool = False, compiled: bool = False
                ) -> Callable[[int], Launch]:
    """circus-wsgi serve, 2 workers, access log off; ``compiled``: the package as a wheel
    built here installs it, its hot modules compiled by mypyc."""
    def launch(port: int) -> Launch:
        argv = [str(BIN / "circus-wsgi"), "serve", APP, "--bind", f"{HOST}:{port}",
                "--workers", "2", "--threads", str(threads), "--chdir", str(ROOT),
                "--access-log="]  # the others write no access log by default either
        if direct:
            argv += ["--mode", "direct", "--flow-control", "false"]
        return Launch(argv + SERVE_ARGS, package_dir=compiled_package() if compiled else "")
    return launch


_COMPILED: list[str] = []  # the directory compiled_package built, once a run
COMPILED = "circus-t1-compiled"  # the server run from it


def compiled_package() -> str:
    """A directory with circus_wsgi as its wheel has it (``pip wheel``: the hot modules
    compiled by mypyc), built on first use and removed when this process exits."""
    if not _COMPILED:
        import atexit
        import zipfile

        directory = tempfile.mkdtemp(prefix="cw-compiled-", dir="/tmp")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "-w", directory, str(ROOT)], check=True,
                       capture_output=True, timeout=600, env={**os.environ,
                                                               "CIRCUS_WSGI_COMPILE": "1"})
        [wheel] = Path(directory).glob("circus_wsgi-*.whl")
        if wheel.name.endswith("-none-any.whl"):
            raise RuntimeError(f"{wheel.name}: the wheel was built without its compiled "
                               "modules (no C compiler?)")
        with zipfile.ZipFile(wheel) as unpacked:
            unpacked.extractall(directory)
        _COMPILED.append(directory)
    return _COMPILED[0]


def two_hosts(port: int) -> Launch:
    """circus-wsgi with one local worker and one in another network namespace, through a
    veth pair (:mod:`benchmarks.two_hosts`); ready once the remote one has announced."""
    from circus_wsgi.settings import Settings
    from circus_wsgi.status import read_status

    tag = os.urandom(3).hex()
    run_dir = f"/tmp/cw-bench-{tag}"

    def remote_announced() -> bool:
        try:
            status = read_status(Settings(run_dir=run_dir), timeout=1)
        except OSError:  # TimeoutError: not running (yet)
            return False
        return any(worker["host"] for worker in status["workers"].values())

    return Launch([sys.executable, "-m", "benchmarks.two_hosts", str(port), tag, run_dir,
                   *SERVE_ARGS], namespace=f"cwf-{tag}", ready=remote_announced,
                  cleanup=lambda: shutil.rmtree(run_dir, ignore_errors=True))


def gunicorn(worker_class: str = "", access_log: bool = False) -> Callable[[int], Launch]:
    """Gunicorn with ``worker_class``, its log at warning; or without one, as its README
    starts it (its default sync worker, log level info, no access log); either with its
    access log on, to stdout."""
    def launch(port: int) -> Launch:
        argv = [str(BIN / "gunicorn"), "--workers", "2", "--bind", f"{HOST}:{port}"]
        if worker_class:
            argv += ["--chdir", str(ROOT), "--log-level", "warning", "--worker-class",
                     worker_class]
        if worker_class == "gthread":
            argv += ["--threads", "4"]
        if access_log:
            argv += ["--access-logfile", "-"]
        return Launch(argv + [APP])
    return launch


def granian(tuned: bool = True, access_log: bool = False) -> Callable[[int], Launch]:
    """Granian with its log at warning and no websockets; or (not ``tuned``) as its
    README starts it; either with its access log on."""
    def launch(port: int) -> Launch:
        argv = [str(BIN / "granian"), "--interface", "wsgi", "--workers", "2",
                "--host", HOST, "--port", str(port)]
        if tuned:
            argv += ["--log-level", "warning", "--no-ws"]
        if access_log:
            argv += ["--access-log"]
        return Launch(argv + [APP])
    return launch


WAITRESS = ("import logging, sys; logging.basicConfig(level=logging.ERROR); "
            "import waitress, benchmarks.apps as apps; "
            "waitress.serve(apps.app, listen=sys.argv[1], threads=4)")


def waitress(port: int) -> Launch:
    # waitress-serve logs a warning per queued task under load; this is the same
    # server with its logging at ERROR.
    return Launch([sys.executable, "-c", WAITRESS, f"{HOST}:{port}"])


def waitress_defaults(port: int) -> Launch:
    """``waitress-serve`` as its documentation starts it (4 threads, no access log)."""
    return Launch([str(BIN / "waitress-serve"), f"--listen={HOST}:{port}", APP])


def circus_config(direct: bool = False) -> Callable[[int], Launch]:
    """circus-wsgi from ``circus-wsgi config``'s files (with --serve-args) run by a plain
    ``circusd circus.ini``, with the --mongrel2-setting values added to config.sqlite:
    for trying mongrel2 settings that circus-wsgi does not expose (yet)."""
    def launch(port: int) -> Launch:
        import sqlite3

        base = Path(tempfile.mkdtemp(prefix="cwt-", dir="/tmp"))
        argv = [str(BIN / "circus-wsgi"), "config", APP, "--out", str(base), "--bind",
                f"{HOST}:{port}", "--workers", "2", "--chdir", str(ROOT), "--access-log="]
        if direct:
            argv += ["--mode", "direct", "--flow-control", "false"]
        subprocess.run(argv + SERVE_ARGS, check=True, capture_output=True, timeout=60,
                       env=_server_env())
        with sqlite3.connect(base / "config.sqlite") as db:
            for key, value in MONGREL2_SETTINGS.items():
                db.execute("DELETE FROM setting WHERE key = ?", (key,))
                db.execute("INSERT INTO setting (key, value) VALUES (?, ?)", (key, value))
        db.close()
        return Launch([sys.executable, "-m", "circus.circusd", str(base / "circus.ini")],
                      cleanup=lambda: shutil.rmtree(base, ignore_errors=True))
    return launch


def _server_env(package_dir: str = "") -> dict[str, str]:
    """The servers' environment: PYTHONPATH is ``package_dir`` (a server's own), then
    --package-dir, then the checkout (for the apps).

    With either, PYTHONSAFEPATH too: ``python -m`` (circusd, the dispatcher, the
    workers) would otherwise put its working directory, the checkout, first on
    sys.path. The apps are still found: on PYTHONPATH, and in the chdir that
    circus-wsgi's workers and Gunicorn put on sys.path themselves.
    """
    first = [package_dir] if package_dir else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*first, *PACKAGE_PATH, str(ROOT)])}
    if first or PACKAGE_PATH:
        env["PYTHONSAFEPATH"] = "1"
    return env


def nullhandler(*args: str) -> Callable[[int], Launch]:
    def launch(port: int) -> Launch:
        return Launch([sys.executable, "-m", "benchmarks.nullhandler", str(port), *args])
    return launch


STATIC_FILES = {"hello.txt": b"Hello, World!", "big.bin": b"x" * (100 * 1024)}


def mongrel2_static(port: int) -> Launch:
    """mongrel2 alone serving files: a config from circus-wsgi's own generator with
    a --static route, mongrel2 run directly."""
    from circus_wsgi.mongrel2 import MONGREL2_WORKING_DIR, write_mongrel2_config
    from circus_wsgi.rundir import RunDir
    from circus_wsgi.settings import Settings

    base = Path(tempfile.mkdtemp(prefix="cwb-", dir="/tmp"))
    files = base / "files"
    files.mkdir()
    for name, content in STATIC_FILES.items():
        (files / name).write_bytes(content)
    settings = Settings(app=APP, bind=f"{HOST}:{port}", static=[("/static", str(files))]
                        ).with_defaults_resolved(str(base / "run"))
    RunDir(Path(settings.run_dir)).create()
    db, _ = write_mongrel2_config(settings, base)
    return Launch(["mongrel2", str(db), settings.server_uuid], cwd=Path(MONGREL2_WORKING_DIR),
                  cleanup=lambda: shutil.rmtree(base, ignore_errors=True))


#: The new shapes' scenarios, and those the ceilings run (they serve no slow clients).
SHAPE_SCENARIOS = tuple(name for names in SHAPES.values() for name in names)
CEILING_SCENARIOS = ("hello", "hello-close", *SHAPES["connections"])
SERVERS = (
    Server("circus-t1", "circus-wsgi, threads 1", circus_wsgi(1), _circus_group,
           python_side=("dispatcher", "workers")),
    Server("gunicorn-sync", "Gunicorn sync", gunicorn("sync"), _master_and_workers),
    Server(COMPILED, "circus-wsgi, threads 1, compiled", circus_wsgi(1, compiled=True),
           _circus_group, scenarios=("hello", "hello-close", "json", "big", "upload",
                                     "hello-1k", "slowclients"),
           python_side=("dispatcher", "workers"),
           note="circus-wsgi as its wheel installs it where a C compiler is there: ``pip "
           "wheel .`` built here, its hot modules compiled by mypyc (circus_wsgi.compiled)."),
    Server("circus-t4", "circus-wsgi, threads 4", circus_wsgi(4), _circus_group,
           python_side=("dispatcher", "workers"), concurrency=8),
    Server("gunicorn-gthread", "Gunicorn gthread 2x4", gunicorn("gthread"),
           _master_and_workers, concurrency=8),
    Server("circus-direct", "circus-wsgi direct (no dispatcher)", circus_wsgi(1, direct=True),
           _circus_group, python_side=("dispatcher", "workers")),
    Server("circus-remote", "circus-wsgi, 1 local + 1 remote worker", two_hosts, _circus_group,
           scenarios=("hello", "big", *SHAPE_SCENARIOS), python_side=("dispatcher", "workers"),
           note="``python -m benchmarks.two_hosts PORT TAG RUN_DIR``: the front (mongrel2, the "
           "dispatcher, one worker) in one network namespace, a worker host (``--role "
           "workers``, one worker) in another, joined by a veth pair, CURVE on; the load "
           "generator runs in the front's namespace."),
    Server("granian", "Granian WSGI", granian(), _master_and_workers,
           concurrency=GRANIAN_CONCURRENCY),
    Server("waitress", "Waitress 1x4 threads", waitress, _single("workers"), concurrency=4),
    Server("m2-null-dispatcher", "dispatcher + null workers (ceiling)",
           nullhandler("--dispatcher"), _circus_group, scenarios=CEILING_SCENARIOS,
           python_side=("dispatcher", "workers"),
           note="``python -m benchmarks.nullhandler PORT --dispatcher``: circus-wsgi's "
           "dispatcher and mongrel2 (flow control on, as circus-wsgi runs them) with two "
           "workers that answer without WSGI: what circus-wsgi would reach if its workers "
           "cost nothing."),
    Server("m2-null", "mongrel2 + null handlers (ceiling)", nullhandler(), _circus_group,
           scenarios=CEILING_SCENARIOS,
           note="``python -m benchmarks.nullhandler PORT``: mongrel2 (flow control off) and "
           "two Python processes that answer with one recv and one send: no design with "
           "Python behind mongrel2 is faster."),
    Server("m2-static", "mongrel2 static file (ceiling)", mongrel2_static, _single("mongrel2"),
           scenarios=(*CEILING_SCENARIOS, "big"),
           paths={"/": "/static/hello.txt", "/big": "/static/big.bin"},
           stop_signals=(signal.SIGTERM, signal.SIGTERM), python_side=(),
           note="``mongrel2 config.sqlite UUID``, the config.sqlite written by circus-wsgi's "
           "own generator (``Settings(static=[('/static', DIR)])``), the files at /static/."),
)
#: The defaults shape: each server as its README starts it, and with its access log on
#: (circus-wsgi's is on by default; Waitress has none); hello only.
VARIANTS = (
    Server("circus-t1-defaults", "circus-wsgi, defaults (access log on)", circus_defaults,
           _circus_group, scenarios=("hello",), python_side=("dispatcher", "workers"),
           variant_of="circus-t1", variant="defaults",
           access_log="on, to stderr (its default)"),
    Server("gunicorn-sync-defaults", "Gunicorn sync, defaults", gunicorn(),
           _master_and_workers, scenarios=("hello",), variant_of="gunicorn-sync",
           variant="defaults",
           access_log="off (its default)"),
    Server("gunicorn-sync-accesslog", "Gunicorn sync, access log on", gunicorn(access_log=True),
           _master_and_workers, scenarios=("hello",), variant_of="gunicorn-sync",
           variant="accesslog",
           access_log="on, to stdout (--access-logfile -)"),
    Server("granian-defaults", "Granian WSGI, defaults", granian(tuned=False),
           _master_and_workers, scenarios=("hello",), variant_of="granian", variant="defaults",
           access_log="off (its default)"),
    Server("granian-accesslog", "Granian WSGI, access log on",
           granian(tuned=False, access_log=True), _master_and_workers, scenarios=("hello",),
           variant_of="granian", variant="accesslog",
           access_log="on (--access-log)"),
    Server("waitress-defaults", "Waitress, defaults", waitress_defaults, _single("workers"),
           scenarios=("hello",), variant_of="waitress", variant="defaults",
           access_log="none (Waitress has no access log)"),
)
CONFIG_NOTE = ("``circus-wsgi config APP --workers 2 --access-log= %s--out DIR`` and "
               "``circusd DIR/circus.ini``, with the --mongrel2-setting values put in "
               "DIR/config.sqlite.")
#: Variants for trying mongrel2 settings, run only when named in --servers.
EXTRA_SERVERS = (
    Server("circus-t1-config", "circus-wsgi, threads 1, tuned mongrel2", circus_config(),
           _circus_group, python_side=("dispatcher", "workers"), note=CONFIG_NOTE % ""),
    Server("circus-direct-config", "circus-wsgi direct, tuned mongrel2",
           circus_config(direct=True), _circus_group, python_side=("dispatcher", "workers"),
           note=CONFIG_NOTE % "--mode direct --flow-control false "),
)
#: Servers --quick leaves out: building the compiled wheel takes a minute.
NOT_QUICK = (COMPILED,)
REFERENCE = "gunicorn-sync"
ROLES = ("mongrel2", "dispatcher", "workers", "manager", "loadgen", "other")


# ---------------------------------------------------------------------------
# Running servers


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


_next_port = iter(PORTS)


def free_port() -> int:
    for port in _next_port:
        if _port_free(port):
            return port
    raise RuntimeError("no free port left in 18200-32000")


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies (Linux prctl)."""
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


GET_STATUS = ("import sys; sys.path.insert(0, %r); from benchmarks.run import _get; "
              "print(_get(sys.argv[1]))" % str(ROOT))


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read()
            return response.status
    except OSError:
        return 0


class Running:
    """One started server: its process tree, its URL, and a bounded stop."""

    def __init__(self, server: Server, logs: Path) -> None:
        self.server = server
        self.port = free_port()
        self.launch = server.launch(self.port)
        self.log_path = logs / f"{server.name}-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.launch.argv, cwd=self.launch.cwd, env=_server_env(self.launch.package_dir),
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent)
        self.root = psutil.Process(self.process.pid)
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.leftovers: list[str] = []

    def url(self, scenario: Scenario) -> str:
        return f"http://{HOST}:{self.port}{self.server.paths.get(scenario.path, scenario.path)}"

    def processes(self) -> list[psutil.Process]:
        """The root and all its descendants now (each remembered for the final stop)."""
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault((proc.pid, proc.create_time()), proc)
        return procs

    def wait_ready(self, scenario: Scenario) -> None:
        """Until the server answers 200 and (circus-wsgi) both workers are running."""
        deadline = time.monotonic() + START_TIMEOUT
        url = self.url(scenario)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.server.name} exited with {self.process.returncode};"
                                   f" see {self.log_path.relative_to(ROOT)}")
            if self.get(url) == 200 and self._workers_up() and \
                    (self.launch.ready is None or self.launch.ready()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.server.name} not ready within {START_TIMEOUT:.0f} s; "
                           f"see {self.log_path.relative_to(ROOT)}")

    def client(self, argv: list[str]) -> list[str]:
        """A client's argv, run where the server's port is."""
        if not self.launch.namespace:
            return argv
        return ["ip", "netns", "exec", self.launch.namespace, *argv]

    def get(self, url: str) -> int:
        """The status of a GET of ``url`` (0: no answer), from where the port is."""
        if not self.launch.namespace:
            return _get(url)
        argv = self.client([sys.executable, "-c", GET_STATUS, url])
        with contextlib.suppress(subprocess.SubprocessError, ValueError):
            return int(subprocess.run(argv, capture_output=True, text=True, timeout=5).stdout)
        return 0

    def _workers_up(self) -> bool:
        if self.server.group is not _circus_group:
            return True
        roles = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                roles.append(_circus_group(proc, self.root.pid))
        return roles.count("workers") >= 2

    def cpu(self) -> dict[tuple[int, float], tuple[str, float]]:
        """CPU seconds (user + system) so far of every process, by (pid, start time)."""
        snapshot = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                snapshot[(proc.pid, proc.create_time())] = (
                    self.server.group(proc, self.root.pid), times.user + times.system)
        return snapshot

    def memory(self) -> dict[str, float]:
        """Resident memory (bytes) of the server's processes now, summed by role."""
        usage: dict[str, float] = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                role = self.server.group(proc, self.root.pid)
                usage[role] = usage.get(role, 0.0) + proc.memory_info().rss
        return usage

    def stop(self) -> None:
        """SIGTERM (twice for mongrel2), wait, then SIGKILL whatever of the tree remains."""
        self.processes()
        deadline = time.monotonic() + STOP_TIMEOUT
        for number, sig in enumerate(self.server.stop_signals):
            if number:
                time.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(max(0.1, deadline - time.monotonic()))
        alive = [p for p in self.seen.values() if _alive(p)]
        _, alive = psutil.wait_procs(alive, timeout=max(0.1, deadline - time.monotonic()))
        if alive:
            self._dump_stacks(alive)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                self.leftovers.append(" ".join(proc.cmdline())[:120] or f"pid {proc.pid}")
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        if alive:
            self._remove_run_dirs()
        self.log.close()
        if self.launch.cleanup:
            self.launch.cleanup()


    def _remove_run_dirs(self) -> None:
        """A killed ``serve`` cannot remove the run dir it made (/tmp/cw-*): do it."""
        for proc in self.seen.values():
            with contextlib.suppress(psutil.Error, ValueError):
                argv = proc.cmdline()
                run_dir = Path(argv[argv.index("--run-dir") + 1])
                if run_dir.parent == Path("/tmp") and run_dir.name.startswith("cw-"):
                    shutil.rmtree(run_dir, ignore_errors=True)

    def _dump_stacks(self, procs: list[psutil.Process]) -> None:
        """Before killing what did not stop: every Python process's threads (py-spy dump),
        into the log directory, for whoever debugs the stop."""
        path = self.log_path.with_suffix(".stuck.txt")
        with open(path, "w") as out:
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    out.write(f"=== {proc.pid}: {' '.join(proc.cmdline())}\n")
                    if "python" not in proc.name():
                        continue
                    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                        out.write(subprocess.run(
                            [str(BIN / "py-spy"), "dump", "--pid", str(proc.pid)],
                            capture_output=True, text=True, timeout=15).stdout)
        self.leftovers.append(f"stacks in {path.relative_to(ROOT)}")


def _alive(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    return False


@contextlib.contextmanager
def running(server: Server, logs: Path, incidents: list[str] | None = None
            ) -> Iterator[Running]:
    """A started server, stopped (and its leftovers killed, and noted) on leaving."""
    instance = Running(server, logs)
    try:
        yield instance
    finally:
        instance.stop()
        if instance.leftovers:
            stacks = [item for item in instance.leftovers if item.startswith("stacks in ")]
            killed = len(instance.leftovers) - len(stacks)
            note = (f"{server.title}: not stopped {STOP_TIMEOUT:.0f} s after SIGTERM; "
                    f"{killed} processes killed; " + "; ".join(stacks))
            print(f"  ! {note}: " + "; ".join(instance.leftovers), flush=True)
            if incidents is not None:
                incidents.append(note)


# ---------------------------------------------------------------------------
# Load


class _Load:
    """A load generator started, SIGKILLed past ``deadline`` seconds unless finished."""

    def __init__(self, argv: list[str], deadline: float) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.timer = _Timer(deadline, self.proc.pid)

    def finish(self) -> tuple[str, float]:
        """Wait for it to end; return its output and its CPU seconds (from its rusage)."""
        proc = self.proc
        try:
            output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            self.timer.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"{self.argv[0]} exited with {proc.returncode}: {output[-500:]}")
        return output, usage.ru_utime + usage.ru_stime


def _bounded(argv: list[str], deadline: float) -> tuple[str, float]:
    """Run a load generator to completion (SIGKILL past ``deadline`` seconds);
    return its output and its CPU seconds."""
    return _Load(argv, deadline).finish()


class _Timer:
    """SIGKILL a process after a deadline, unless cancelled."""

    def __init__(self, seconds: float, pid: int) -> None:
        self._timer = threading.Timer(seconds, lambda: _kill_quietly(pid))
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _machine_busy() -> float:
    """CPU seconds all cores have spent busy since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _report_line(output: str) -> dict:
    for line in output.splitlines():
        if line.startswith("BENCH-JSON "):
            return json.loads(line[len("BENCH-JSON "):])
    raise RuntimeError(f"no report in the load generator's output: {output[-500:]}")


def wrk_argv(url: str, scenario: Scenario, duration: float, threads: int) -> list[str]:
    seconds = max(1, round(duration))  # wrk takes whole seconds
    if scenario.connections > CONNECTIONS:
        threads = max(threads, MANY_CONNECTIONS_THREADS)
    argv = ["wrk", f"-t{threads}", f"-c{scenario.connections}", f"-d{seconds}s",
            "--timeout", "10s", "-s", str(WRK_SCRIPT)]
    if scenario.close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    if scenario.method != "GET":
        argv += ["--", scenario.method, str(scenario.body_size)]
    return argv


def _origin(url: str) -> str:
    return "/".join(url.split("/", 3)[:3])


def mix_capacity(server: Server, hello_rps: float) -> float:
    """The slow mix's rate ``server`` can answer: its hello rate, or what its threads
    allow when one request in SLOW_EVERY holds one of them for SLOW_SECONDS."""
    return min(hello_rps, server.concurrency * SLOW_EVERY / SLOW_SECONDS)


def slowmix_argv(url: str, duration: float, rate: float) -> list[str]:
    """The slow mix at ``rate``; above the fixed rate, with connections enough for the slow
    requests (about ``rate`` / 100 of them in flight, twice that) besides the usual 50."""
    connections = CONNECTIONS + (2 * round(rate / 100) if rate > SLOWMIX_RATE else 0)
    return [sys.executable, str(BENCH / "slowmix.py"), _origin(url), "--duration",
            f"{duration:g}", "--rate", f"{rate:.0f}", "--connections", str(connections)]


def slowclients_argv(url: str, duration: float) -> list[str]:
    return [sys.executable, str(BENCH / "slowclients.py"), _origin(url),
            "--slowloris", str(SLOWLORIS_CLIENTS), "--readers", str(SLOW_READERS),
            "--read-rate", str(SLOW_READ_RATE), "--duration", f"{duration:g}"]


def wait_for_quiet(max_wait: float, threshold: float = QUIET_THRESHOLD) -> float:
    """Wait (at most ``max_wait`` s) until the machine's other work uses under
    ``threshold`` of a core, with the server under test idle; return the seconds waited.

    The box may be shared with jobs this benchmark cannot see or stop (other
    containers): starting runs in their quiet moments keeps the numbers cleaner,
    and each run's "other" CPU shows what was left.
    """
    started = time.monotonic()
    while True:
        before = _machine_busy()
        time.sleep(QUIET_SAMPLE)
        if (_machine_busy() - before) / QUIET_SAMPLE < threshold \
                or time.monotonic() - started >= max_wait:
            return time.monotonic() - started


def measure(instance: Running, scenario: Scenario, duration: float, wrk_threads: int,
            quiet_wait: float = 0.0, baseline: dict | None = None) -> dict:
    """One load run against a running server: throughput, latency, CPU by role, and the
    resident memory of its processes near the end. ``baseline``: the same server start's
    result of ``scenario.baseline``, which a slow mix at a share of it needs."""
    waited = wait_for_quiet(quiet_wait) if quiet_wait else 0.0
    url = instance.url(scenario)
    rate = SLOWMIX_RATE
    if scenario.rate_share:
        if baseline is None:
            raise RuntimeError(f"{scenario.name} needs {scenario.baseline} first")
        rate = scenario.rate_share * mix_capacity(instance.server, baseline["rps"])
    if scenario.client == "slowmix":
        argv = slowmix_argv(url, duration, rate)
    else:
        argv = wrk_argv(url, scenario, duration, wrk_threads)
    before, machine_before = instance.cpu(), _machine_busy()
    started = time.monotonic()
    slow_clients = None
    if scenario.client == "slowclients":
        slow_clients = _Load(instance.client(slowclients_argv(
            url, SLOW_CLIENTS_LEAD + duration + 0.5)), SLOW_CLIENTS_LEAD + duration + 40)
        time.sleep(SLOW_CLIENTS_LEAD)
    memory = _Sampler(0.8 * duration, instance.memory)
    output, loadgen_cpu = _bounded(instance.client(argv), duration + 30)
    memory.cancel()
    more: dict[str, float] = {f"rss_mb:{role}": rss / 2**20
                              for role, rss in memory.value.items()}
    if memory.value:
        more["rss_mb"] = sum(memory.value.values()) / 2**20
    if slow_clients is not None:
        slow_output, slow_cpu = slow_clients.finish()
        loadgen_cpu += slow_cpu
        slow = _report_line(slow_output)
        more.update({"loris_connections": slow["slowloris"]["connections"],
                     "loris_closed": slow["slowloris"]["closed_by_server"],
                     "reader_kb_s": slow["readers"]["bytes_per_s_each"] / 1024,
                     "reader_responses": slow["readers"]["responses"],
                     "reader_cut": slow["readers"]["cut"],
                     "slow_connect_errors": slow["slowloris"]["connect_errors"]
                     + slow["readers"]["connect_errors"]})
    wall = time.monotonic() - started
    after, machine_after = instance.cpu(), _machine_busy()
    report = _report_line(output)
    cpu = {role: 0.0 for role in ROLES}
    per_process: dict[str, tuple[str, float]] = {}
    for key, (role, seconds) in after.items():
        used = seconds - before.get(key, (role, 0.0))[1]
        cpu[role] += used
        per_process[str(key[0])] = (role, used)
    cpu["loadgen"] = loadgen_cpu
    # CPU the machine spent on anything else (other people's jobs, the kernel's
    # softirq work not charged to a process): a check on the run's cleanliness.
    cpu["other"] = max(0.0, machine_after - machine_before - sum(cpu.values()))
    seconds = report["duration_us"] / 1e6
    result = {"server": instance.server.name, "scenario": scenario.name, "wall": wall,
              "waited_for_quiet": waited,
              "requests": report["requests"], "rps": report["requests"] / seconds,
              "cpu": cpu, "load_seconds": seconds, "raw": report,
              "vanished": sorted(role for key, (role, _) in before.items() if key not in after),
              "processes": per_process, "idle_workers": _idle_workers(per_process, scenario)}
    if scenario.client == "slowmix":
        result["p50_ms"] = report["fast"]["latency_us"]["50"] / 1000
        result["p99_ms"] = report["fast"]["latency_us"]["99"] / 1000
        result["errors"] = report["fast"]["errors"] + report["slow"]["errors"]
        more.update({"asked_rate": rate, "slow_p99_ms": report["slow"]["latency_us"]["99"] / 1000})
    else:
        result["p50_ms"] = report["latency_us"]["50"] / 1000
        result["p99_ms"] = report["latency_us"]["99"] / 1000
        errors = report["errors"]
        result["errors"] = errors["connect"] + errors["write"] + errors["status"] \
            + errors["timeout"]
        result["resets"] = errors["read"]  # a read failed: reset, or closed mid-response
        # wrk counts every response; the ones that were no refusal (503 and the like):
        more["ok_rps"] = (report["requests"] - errors["status"]) / seconds
    if baseline is not None:
        more.update({"base_rps": baseline["rps"], "base_p99_ms": baseline["p99_ms"],
                     "kept_pct": 100 * result["rps"] / baseline["rps"]})
        if result["requests"]:  # no response, no latency
            more["p99_x"] = result["p99_ms"] / baseline["p99_ms"]
    result["more"] = more
    return result


class _Sampler:
    """Call ``sample`` once, ``delay`` seconds from now (in a thread), unless cancelled
    first; its answer is in ``value``."""

    def __init__(self, delay: float, sample: Callable[[], dict[str, float]]) -> None:
        self.value: dict[str, float] = {}
        self._timer = threading.Timer(delay, lambda: self.value.update(sample()))
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()
        self._timer.join()


# ---------------------------------------------------------------------------
# The run


def run_rounds(servers: list[Server], scenarios: list[Scenario], rounds: int, duration: float,
               slow_duration: float, warmup: float, wrk_threads: int, quiet_wait: float,
               out: Path, incidents: list[str]) -> list[dict]:
    """Every load run of every round; what went wrong on the way is noted in ``incidents``
    (a server that failed to start or stop, a worker that did nothing)."""
    results: list[dict] = []
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for number in range(1, rounds + 1):
        for server in servers:
            wanted = [s for s in scenarios
                      if server.scenarios is None or s.name in server.scenarios]
            if not wanted:
                continue
            try:
                with running(server, logs, incidents) as instance:
                    first = SCENARIOS_BY_NAME["hello"]
                    instance.wait_ready(first)
                    if warmup:
                        _bounded(instance.client(wrk_argv(instance.url(first), first, warmup,
                                                          wrk_threads)), warmup + 30)
                    done: dict[str, dict] = {}
                    for scenario in wanted:
                        run_duration = slow_duration if scenario.client == "slowmix" \
                            else duration
                        baseline = done.get(scenario.baseline)
                        if scenario.baseline and baseline is None:
                            incidents.append(f"{server.title}, round {number}: no "
                                             f"{scenario.baseline} result for {scenario.name}")
                            continue
                        result = measure(instance, scenario, run_duration, wrk_threads,
                                         quiet_wait, baseline)
                        result["round"] = number
                        results.append(result)
                        done[scenario.name] = result
                        if result["idle_workers"]:
                            incidents.append(
                                f"{server.title}, round {number}, {scenario.title}: worker "
                                f"process(es) {', '.join(result['idle_workers'])} used under a "
                                "tenth of the busiest worker's CPU (work not shared: stuck, "
                                "or the other held every connection)")
                        print(f"round {number} {server.name:16} {scenario.name:12} "
                              f"{result['rps']:9.0f} req/s  p50 {result['p50_ms']:7.2f} ms  "
                              f"p99 {result['p99_ms']:8.2f} ms  errors {result['errors']}"
                              f"{_resets(result.get('resets', 0))}  other CPU "
                              f"{100 * result['cpu']['other'] / result['load_seconds']:.0f} %"
                              + (f"  ! idle worker(s) {', '.join(result['idle_workers'])}"
                                 if result["idle_workers"] else ""), flush=True)
            except RuntimeError as error:  # the server failed: say so, go on with the others
                incidents.append(f"{server.title} failed in round {number}: {error}")
                print(f"round {number} {server.name:16} FAILED: {error}", flush=True)
    return results


def _idle_workers(per_process: dict[str, tuple[str, float]], scenario: Scenario) -> list[str]:
    """Worker processes that did (almost) nothing while another was saturated: stuck, or
    left without connections (a kernel accept queue may hand every keep-alive connection
    to one Gunicorn worker)."""
    workers = {pid: used for pid, (role, used) in per_process.items() if role == "workers"}
    if scenario.client != "wrk" or len(workers) < 2:
        return []
    busiest = max(workers.values())
    return [pid for pid, used in workers.items() if used < 0.1 * busiest]


def _resets(count: int) -> str:
    return f" (+{count:,} read errors)" if count else ""


SCENARIOS_BY_NAME = {s.name: s for s in SCENARIOS}
SERVERS_BY_NAME = {s.name: s for s in SERVERS + VARIANTS + EXTRA_SERVERS}


# ---------------------------------------------------------------------------
# Profiles


def _collapsed(path: Path) -> tuple[int, dict[str, int], dict[str, int]]:
    """Total samples, self samples and inclusive samples per function, from py-spy's
    raw (collapsed) output. A function is "name (file)", line numbers dropped."""
    total, own, inclusive = 0, {}, {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    return total, own, inclusive


def _thread_kind(pid: int, tid: int) -> str:
    """What a thread is, from its kernel name: the interpreter's own, or ZeroMQ's."""
    if tid == pid:
        return "main"
    try:
        comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "other"
    if comm.startswith("ZMQbg/IO"):
        return "zmq-io"
    if comm.startswith("ZMQbg"):
        return "zmq-other"
    return "app-threads" if comm.startswith("python") else comm


def thread_cpu(instance: Running) -> dict[str, dict[str, float]]:
    """CPU seconds by role and thread kind, and context switches by role."""
    usage: dict[str, dict[str, float]] = {}
    for proc in instance.processes():
        with contextlib.suppress(psutil.Error):
            role = instance.server.group(proc, instance.root.pid)
            if role in ("manager",):
                continue
            cell = usage.setdefault(role, {})
            for thread in proc.threads():
                kind = _thread_kind(proc.pid, thread.id)
                cell[kind] = cell.get(kind, 0.0) + thread.user_time + thread.system_time
            switches = proc.num_ctx_switches()
            cell["ctx-voluntary"] = cell.get("ctx-voluntary", 0) + switches.voluntary
            cell["ctx-involuntary"] = cell.get("ctx-involuntary", 0) + switches.involuntary
    return usage


def _sampler(role: str, pid: int, duration: float, profiles: Path) -> list[str] | None:
    """The command that samples one process: py-spy for Python, perf for mongrel2."""
    if role == "mongrel2":
        if not shutil.which("perf"):
            return None
        return ["perf", "record", "-q", "-F", "499", "-g", "-o",
                str(profiles / "mongrel2.perf.data"), "-p", str(pid), "--", "sleep",
                f"{duration:g}"]
    return [str(BIN / "py-spy"), "record", "--pid", str(pid), "--duration", f"{duration:g}",
            "--rate", "250", "--format", "raw", "--nonblocking",
            "--output", str(profiles / f"{role}.txt")]


def _perf_dsos(pid: int, duration: float, path: Path) -> subprocess.Popen | None:
    """perf on a Python process, for the split between interpreter, libzmq and kernel."""
    if not shutil.which("perf"):
        return None
    return subprocess.Popen(["perf", "record", "-q", "-F", "499", "-o", str(path), "-p",
                             str(pid), "--", "sleep", f"{duration:g}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_die_with_parent)


def _perf_report(path: Path, sort: str, limit: float) -> list[tuple[float, str]]:
    report = subprocess.run(["perf", "report", "-i", str(path), "--stdio", "--no-children",
                             "--sort", sort, "-g", "none", "--percent-limit", str(limit)],
                            capture_output=True, text=True, timeout=120)
    path.with_suffix(".txt").write_text(report.stdout)
    rows = []
    for line in report.stdout.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(.*)", line)
        if match and not line.lstrip().startswith("#"):
            rows.append((float(match.group(1)), " ".join(match.group(2).split())))
    return rows


def profile(server: Server, duration: float, wrk_threads: int, out: Path) -> dict:
    """Where circus-wsgi's time goes under the hello keep-alive load.

    First a clean run gives the CPU of every thread (the interpreter's own thread
    and ZeroMQ's I/O thread of each process) and the context switches, per request.
    Then a sampled run: py-spy on the dispatcher and one worker, perf on mongrel2
    (by symbol) and on the dispatcher and worker (by shared object: interpreter,
    libzmq, kernel). Raw files stay in ``out/profiles``.
    """
    profiles = out / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    scenario = SCENARIOS_BY_NAME["hello"]
    found: dict = {"server": server.name, "duration": duration, "targets": {}}
    with running(server, out / "logs") as instance:
        instance.wait_ready(scenario)
        _bounded(instance.client(wrk_argv(instance.url(scenario), scenario, 2, wrk_threads)),
                 32)
        before = thread_cpu(instance)
        clean = measure(instance, scenario, duration, wrk_threads)
        after = thread_cpu(instance)
        requests = max(1, clean["requests"])
        found["clean"] = {"rps": clean["rps"], "requests": clean["requests"], "threads": {
            role: {kind: (value - before.get(role, {}).get(kind, 0.0)) / requests
                   for kind, value in kinds.items()} for role, kinds in after.items()}}
        targets: dict[str, int] = {}
        for proc in instance.processes():
            with contextlib.suppress(psutil.Error):
                role = server.group(proc, instance.root.pid)
                if role in ("dispatcher", "workers", "mongrel2") and role not in targets:
                    targets[role] = proc.pid
        samplers = []
        for role, pid in targets.items():
            argv = _sampler(role, pid, duration, profiles)
            if argv:
                samplers.append((role, subprocess.Popen(
                    argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                    start_new_session=True, preexec_fn=_die_with_parent)))
            if role != "mongrel2":
                perf = _perf_dsos(pid, duration, profiles / f"{role}.perf.data")
                if perf:
                    samplers.append((role + "-perf", perf))
        time.sleep(0.5)
        load = measure(instance, scenario, duration + 1, wrk_threads)
        found["load"] = {k: load[k] for k in ("rps", "cpu", "load_seconds", "requests")}
        for role, proc in samplers:
            try:
                _, err = proc.communicate(timeout=duration + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            found["targets"].setdefault(role, {}).update({
                "returncode": proc.returncode,
                "stderr": (err or b"").decode(errors="replace")[-400:]})
    for role in ("dispatcher", "workers"):
        path = profiles / f"{role}.txt"
        if path.exists():
            total, own, inclusive = _collapsed(path)
            found["targets"][role].update({
                "file": str(path.relative_to(ROOT)), "samples": total,
                "self": sorted(own.items(), key=lambda kv: -kv[1])[:15],
                "inclusive": sorted(inclusive.items(), key=lambda kv: -kv[1])[:25]})
        perf_data = profiles / f"{role}.perf.data"
        if perf_data.exists():
            found["targets"].setdefault(role, {})["dsos"] = _perf_report(perf_data, "dso", 1.0)
    perf_data = profiles / "mongrel2.perf.data"
    if perf_data.exists():
        found["targets"].setdefault("mongrel2", {})["top"] = \
            _perf_report(perf_data, "dso,sym", 1.5)[:15]
    return found


# ---------------------------------------------------------------------------
# Summary and targets


def summarize(results: list[dict]) -> dict[str, dict[str, dict]]:
    """Median over rounds of every measure, by server and scenario."""
    table: dict[str, dict[str, dict]] = {}
    for result in results:
        cell = table.setdefault(result["server"], {}).setdefault(result["scenario"], {
            "rps": [], "p50_ms": [], "p99_ms": [], "errors": 0, "resets": 0, "rounds": 0,
            "cpu_pct": {role: [] for role in ROLES}, "cpu_us_per_req": {r: [] for r in ROLES},
            "balanced": [], "more": {}})
        cell["rounds"] += 1
        for key, value in result.get("more", {}).items():
            cell["more"].setdefault(key, []).append(value)
        if not result.get("idle_workers"):
            cell["balanced"].append(result["rps"])
        cell["errors"] += result["errors"]
        cell["resets"] += result.get("resets", 0)
        for key in ("rps", "p50_ms", "p99_ms"):
            cell[key].append(result[key])
        for role in ROLES:
            seconds = result["cpu"].get(role, 0.0)
            cell["cpu_pct"][role].append(100 * seconds / result["load_seconds"])
            cell["cpu_us_per_req"][role].append(1e6 * seconds / max(1, result["requests"]))
    for cells in table.values():
        for cell in cells.values():
            cell["imbalanced"] = cell["rounds"] - len(cell["balanced"])
            # req/s over the rounds in which every worker process worked (None: no such
            # round): what a comparison with this server as the reference uses.
            cell["balanced"] = statistics.median(cell["balanced"]) if cell["balanced"] else None
            for key in ("rps", "p50_ms", "p99_ms"):
                cell[key] = statistics.median(cell[key])
            for key in ("cpu_pct", "cpu_us_per_req", "more"):
                cell[key] = {role: statistics.median(v) for role, v in cell[key].items()}
    return table


def python_us(table: dict, server: str, scenario: str = "hello") -> float | None:
    cell = table.get(server, {}).get(scenario)
    if not cell:
        return None
    roles = SERVERS_BY_NAME[server].python_side
    return sum(cell["cpu_us_per_req"][role] for role in roles)


@dataclass
class Target:
    text: str
    value: float | None
    limit: float
    unit: str
    at_least: bool = True
    issue: int = 6  # the issue that set it
    retired: str = ""  # why it no longer counts (and by which issue)
    shape: str = ""  # the load shape (SHAPES, or "defaults") whose section shows it too

    @property
    def state(self) -> str:
        if self.retired:
            return "retired"
        if self.value is None:
            return "not measured"
        good = self.value >= self.limit if self.at_least else self.value <= self.limit
        return "holds" if good else "MISSED"


def _ratio(table: dict, server: str, other: str, scenario: str, key: str = "rps"):
    """``server``'s measure over ``other``'s. Against req/s, ``other`` counts only its
    rounds in which all its worker processes worked, when it had such rounds: a
    reference with an idle worker would flatter the comparison."""
    a = table.get(server, {}).get(scenario)
    b = table.get(other, {}).get(scenario)
    if not a or not b or not b[key]:
        return None
    reference = b["balanced"] if key == "rps" and b.get("imbalanced") and b["balanced"] \
        else b[key]
    return a[key] / reference


def _more(table: dict, server: str, scenario: str, key: str) -> float | None:
    """A scenario's own measure (the median over rounds of ``result["more"][key]``)."""
    return table.get(server, {}).get(scenario, {}).get("more", {}).get(key)


def _more_ratio(table: dict, server: str, other: str, scenario: str, key: str
                ) -> float | None:
    a, b = _more(table, server, scenario, key), _more(table, other, scenario, key)
    return a / b if a is not None and b else None


def _log_cost(table: dict, server: str) -> float | None:
    """How much of ``server``'s hello rate its defaults variant (access log on) loses, %."""
    variant = next((v.name for v in VARIANTS if v.variant_of == server
                    and v.variant == "defaults"), "")
    ratio = _ratio(table, variant, server, "hello")
    return None if ratio is None else 100 * (1 - ratio)


def targets(table: dict, server: str = "circus-t1") -> list[Target]:
    """Issue 6's and issue 20's targets, measured on circus-wsgi's default configuration."""
    return [
        Target("hello keep-alive >= 2.5x Gunicorn sync",
               _ratio(table, server, "gunicorn-sync", "hello"), 2.5, "x"),
        Target("hello keep-alive >= 1.5x Gunicorn gthread",
               _ratio(table, server, "gunicorn-gthread", "hello"), 1.5, "x"),
        Target("hello keep-alive >= 0.55x the mongrel2 static ceiling",
               _ratio(table, server, "m2-static", "hello"), 0.55, "x",
               retired="by issue 20: a static file never crosses to Python; the "
               "null-handler ceiling replaces it"),
        Target("hello Connection: close >= 1.4x Gunicorn sync",
               _ratio(table, server, "gunicorn-sync", "hello-close"), 1.4, "x"),
        Target("slow mix: fast requests' p99 <= 2x Gunicorn sync's",
               _ratio(table, server, "gunicorn-sync", "slowmix", "p99_ms"), 2.0, "x",
               at_least=False),
        Target("Python side (dispatcher + workers) <= 45 us CPU per hello request",
               python_us(table, server), 45.0, "us", at_least=False),
        Target("100 KB responses: req/s >= Gunicorn sync",
               _ratio(table, server, "gunicorn-sync", "big"), 1.0, "x"),
        Target("1 MB uploads: req/s >= Gunicorn sync",
               _ratio(table, server, "gunicorn-sync", "upload"), 1.0, "x"),
        Target("hello keep-alive >= 3x Gunicorn sync",
               _ratio(table, server, "gunicorn-sync", "hello"), 3.0, "x", issue=20),
        Target("hello keep-alive >= 0.6x the mongrel2 + null handlers ceiling",
               _ratio(table, server, "m2-null", "hello"), 0.6, "x", issue=20),
        Target("Python side (dispatcher + workers) <= 30 us CPU per hello request",
               python_us(table, server), 30.0, "us", at_least=False, issue=20),
        Target("compiled: hello keep-alive >= 3x Gunicorn sync",
               _ratio(table, COMPILED, "gunicorn-sync", "hello"), 3.0, "x", issue=20),
        Target("compiled: hello keep-alive >= 0.6x the mongrel2 + null handlers ceiling",
               _ratio(table, COMPILED, "m2-null", "hello"), 0.6, "x", issue=20),
        Target("compiled: Python side <= 30 us CPU per hello request",
               python_us(table, COMPILED), 30.0, "us", at_least=False, issue=20),
        Target("compiled: 1 MB uploads: req/s >= Gunicorn sync",
               _ratio(table, COMPILED, "gunicorn-sync", "upload"), 1.0, "x", issue=20),
        Target("defaults: the default access log costs <= 10 % of the log-off hello rate",
               _log_cost(table, server), 10.0, "%", at_least=False, issue=20, shape="defaults"),
        Target("1,000 connections: req/s (2xx) >= 3x Gunicorn sync",
               _more_ratio(table, server, "gunicorn-sync", "hello-1k", "ok_rps"), 3.0, "x",
               issue=20, shape="connections"),
        Target("compiled: 1,000 connections: req/s (2xx) >= 3x Gunicorn sync",
               _more_ratio(table, COMPILED, "gunicorn-sync", "hello-1k", "ok_rps"), 3.0, "x",
               issue=20, shape="connections"),
        Target("slow clients: the fast load keeps >= 90 % of its req/s",
               _more(table, server, "slowclients", "kept_pct"), 90.0, "%", issue=20,
               shape="slowclients"),
        Target("slow clients: the fast load's p99 <= 2x its own without them",
               _more(table, server, "slowclients", "p99_x"), 2.0, "x", at_least=False,
               issue=20, shape="slowclients"),
        Target("slow mix at half capacity: fast p99 <= Gunicorn sync's",
               _ratio(table, server, "gunicorn-sync", "slowmix-half", "p99_ms"), 1.0, "x",
               at_least=False, issue=20, shape="slowmix-half"),
        Target("slow mix at half capacity: fast p99 <= Granian's",
               _ratio(table, server, "granian", "slowmix-half", "p99_ms"), 1.0, "x",
               at_least=False, issue=20, shape="slowmix-half"),
    ]


# ---------------------------------------------------------------------------
# Environment


def _command_output(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = ""
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    import zmq
    commit = _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "-C", str(ROOT), "status", "--porcelain",
                             "--untracked-files=no", "--", "circus_wsgi"])
    dpkg = lambda pkg: _command_output(["dpkg-query", "-W", "-f", "${Version}", pkg])  # noqa: E731
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": os_name, "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "circus-wsgi": f"{_dist_version('circus-wsgi')} (git {commit}"
                           f"{', with uncommitted changes' if dirty else ''}"
                           f"{', package from ' + PACKAGE_PATH[0] if PACKAGE_PATH else ''})",
            "mongrel2": dpkg("mongrel2-core"), "wrk": dpkg("wrk"),
            "libzmq5 (mongrel2's)": dpkg("libzmq5"), "circus": _dist_version("circus"),
            "pyzmq": zmq.pyzmq_version(), "libzmq (pyzmq's)": zmq.zmq_version(),
            "tnetstring3": _dist_version("tnetstring3"),
            "gunicorn": _dist_version("gunicorn"), "granian": _dist_version("granian"),
            "waitress": _dist_version("waitress"), "py-spy": _dist_version("py-spy"),
        },
    }


# ---------------------------------------------------------------------------
# The document


def _rst_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)).rstrip()

    return [rule, line(header), rule, *(line(r) for r in rows), rule]


def _fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{suffix}"


ROLE_ABBREVIATIONS = {"mongrel2": "m2", "dispatcher": "disp", "workers": "workers",
                      "manager": "mgr", "loadgen": "wrk", "other": "other"}


def _roles(server: Server) -> tuple[str, ...]:
    """The CPU roles a server has, in table order."""
    if server.group is _circus_group:
        return ("mongrel2", "dispatcher", "workers", "manager", "loadgen", "other")
    if server.name == "m2-static":
        return ("mongrel2", "loadgen", "other")
    return ("workers", "manager", "loadgen", "other")


def _cpu_cell(cell: dict, server: Server) -> str:
    return "/".join(f"{cell['cpu_pct'][role]:.0f}" for role in _roles(server))


def _cpu_legend(server: Server) -> str:
    return "/".join(ROLE_ABBREVIATIONS[role] for role in _roles(server))


def scenario_table(table: dict, scenario: Scenario, servers: list[Server]) -> list[str]:
    ref = table.get(REFERENCE, {}).get(scenario.name)
    header = ["server", "req/s", "x sync", "p50 ms", "p99 ms", "errors",
              "CPU % of a core", "(roles)", "Python us/req"]
    if scenario.client == "slowmix":
        header = ["server", "req/s", "fast p50 ms", "fast p99 ms", "p99 / sync's", "errors",
                  "CPU % of a core", "(roles)"]
    rows = []
    for server in servers:
        cell = table.get(server.name, {}).get(scenario.name)
        if not cell:
            continue
        us = python_us(table, server.name, scenario.name)
        if scenario.client == "slowmix":
            ratio = cell["p99_ms"] / ref["p99_ms"] if ref and ref["p99_ms"] else None
            rows.append([server.title, _fmt(cell["rps"]), _fmt(cell["p50_ms"], 2),
                         _fmt(cell["p99_ms"], 2), _fmt(ratio, 2), str(cell["errors"]),
                         _cpu_cell(cell, server), _cpu_legend(server)])
        else:
            ratio = _ratio(table, server.name, REFERENCE, scenario.name)
            rows.append([server.title, _fmt(cell["rps"]), _fmt(ratio, 2), _fmt(cell["p50_ms"], 2),
                         _fmt(cell["p99_ms"], 2), str(cell["errors"]) + _resets(cell["resets"]),
                         _cpu_cell(cell, server), _cpu_legend(server),
                         _fmt(us, 1) if server.python_side else "-"])
    lines = _rst_table(header, rows)
    for server in servers:
        cell = table.get(server.name, {}).get(scenario.name)
        if cell and cell.get("imbalanced"):
            lines += ["", f"{server.title}: in {cell['imbalanced']} of {cell['rounds']} "
                      "rounds one worker process did almost nothing (under a tenth of the "
                      "busiest one's CPU)"
                      + (f"; over its other rounds it made {_fmt(cell['balanced'])} req/s, "
                         "which ratios against it use." if cell["balanced"] else ".")]
    return lines


@dataclass
class Panel:
    """One bar chart of a figure: a bar per (label, value, server name)."""

    title: str
    xlabel: str
    bars: list[tuple[str, float, str]]
    log: bool = False  # a log scale, for latencies that span decades


def _color(server: str) -> str:
    return "tab:red" if server.startswith("circus") else \
        "tab:gray" if server.startswith("m2-") else "tab:blue"


def draw(panels: list[Panel], path: Path, title: str) -> None:
    """The panels, two to a row, into one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in panels if p.bars]
    columns = 2 if len(panels) > 1 else 1
    rows = max(1, (len(panels) + columns - 1) // columns)
    width = 6.5 * columns if columns > 1 else 9.0  # room for the title over one panel
    fig, axes = plt.subplots(rows, columns, figsize=(width, 2.6 + 2.4 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        names = [label for label, _, _ in panel.bars][::-1]
        values = [value for _, value, _ in panel.bars][::-1]
        ax.barh(names, values, color=[_color(server) for _, _, server in panel.bars][::-1])
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel, fontsize=8)
        if panel.log:
            ax.set_xscale("log")
            ax.set_xlim(right=max(values) * 3)
        else:
            ax.set_xlim(0, max(values) * 1.18 or 1)  # room for the labels
        ax.tick_params(labelsize=8)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:,.0f}" if value >= 10 else f" {value:.1f}",
                    va="center", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot(table: dict, scenarios: list[Scenario], servers: list[Server], path: Path) -> None:
    panels = []
    for scenario in scenarios:
        slow = scenario.client == "slowmix"
        bars = [(server.title, cell["p99_ms"] if slow else cell["rps"], server.name)
                for server in servers
                if (cell := table.get(server.name, {}).get(scenario.name))]
        panels.append(Panel(scenario.title, "fast requests' p99 latency, ms (lower is better)"
                            if slow else "requests/s (median)", bars, log=slow))
    draw(panels, path, PLOT_TITLE)


PLOT_TITLE = "circus-wsgi and its peers, 2 worker processes each, 2 cores, 127.0.0.1"


# ---------------------------------------------------------------------------
# The load shapes of issue 20: a section each (what was run, a table, a plot, the targets)


def _cell(table: dict, server: str, scenario: str) -> dict | None:
    return table.get(server, {}).get(scenario)


def _fmt_ratio(value: float | None, suffix: str = "") -> str:
    """A ratio to two decimals, or to two significant digits below 0.01."""
    digits = 1 - math.floor(math.log10(value)) if value is not None and 0 < value < 0.01 \
        else 2
    return _fmt(value, digits, suffix)


def _measured(target: Target) -> str:
    if target.unit == "x":
        return _fmt_ratio(target.value, " x")
    return _fmt(target.value, 1, " " + target.unit)


def _target_lines(checks: list[Target], shape: str) -> list[str]:
    lines = [f"- Target: {t.text}: {_measured(t)}, **{t.state}**."
             for t in checks if t.shape == shape]
    return lines + [""] if lines else []


def _section(title: str, text: str, header: list[str], rows: list[list[str]],
             panels: list[Panel], png: Path, checks: list[Target], shape: str) -> list[str]:
    draw(panels, png, f"{title}: {PLOT_TITLE}")
    return [title, "~" * len(title), "", text, "", f".. image:: {png.name}", "   :width: 100%",
            "", *_rst_table(header, rows), "", *_target_lines(checks, shape)]


def _variants(base: Server, names: set[str]) -> dict[str, Server]:
    return {v.variant: v for v in VARIANTS if v.variant_of == base.name and v.name in names}


def defaults_section(table: dict, servers: list[Server], checks: list[Target],
                     png: Path) -> list[str]:
    names = {s.name for s in servers}
    rows, bars = [], []
    for base in SERVERS:
        variants = _variants(base, names)
        defaults = variants.get("defaults")
        if defaults is None or not _cell(table, defaults.name, "hello"):
            continue
        logged = variants.get("accesslog") or \
            (defaults if defaults.access_log.startswith("on") else None)
        off, shipped = _cell(table, base.name, "hello"), _cell(table, defaults.name, "hello")
        on = _cell(table, logged.name, "hello") if logged else None
        cells = [off, shipped, on]
        rows.append([base.title, _fmt(off["rps"] if off else None), _fmt(shipped["rps"]),
                     _fmt(_ratio(table, defaults.name, base.name, "hello"), 2),
                     defaults.access_log, _fmt(on["rps"] if on else None),
                     _fmt(_ratio(table, logged.name, base.name, "hello") if logged else None, 2),
                     " / ".join(_fmt(c["p99_ms"], 2) if c else "-" for c in cells)])
        for label, cell in zip(("log off", "defaults", "access log on"), cells, strict=True):
            if cell and (label != "access log on" or logged is not defaults):
                bars.append((f"{base.title}: {label}", cell["rps"], base.name))
    if not rows:
        return []
    text = ("hello keep-alive (as in the table above) on each server started as its own "
            "README starts it, with 2 worker processes as everywhere here (Waitress: its "
            "4 threads): its default log level and its default access log, then (a second "
            "server start) with its access log on. *log off* is the server as the rest of "
            "this page runs it (no access log, logging at warning); *x log off* its ratio "
            "to that, in the same run. Each server's standard output and error go to a file "
            "in the results directory, so an access log costs its formatting and a write to "
            "a file. p99 ms: log off / defaults / log on.")
    header = ["server", "log off req/s", "defaults req/s", "x log off", "default access log",
              "log on req/s", "x log off", "p99 ms"]
    return _section("Defaults as shipped", text, header, rows,
                    [Panel("hello keep-alive: log off, defaults, access log on",
                           "requests/s (median)", bars)], png, checks, "defaults")


def _roles_memory(cell: dict, server: Server) -> str:
    return "/".join(f"{cell['more'].get('rss_mb:' + role, 0.0):.0f}"
                    for role in _roles(server) if role not in ("loadgen", "other"))


def connections_section(table: dict, servers: list[Server], checks: list[Target], png: Path,
                        data: dict) -> list[str]:
    scenarios = [SCENARIOS_BY_NAME[n] for n in SHAPES["connections"]]
    shown = [s for s in servers if any(_cell(table, s.name, c.name) for c in scenarios)]
    if not shown:
        return []
    header = ["server"]
    for scenario in scenarios:
        header += [f"{scenario.connections:,}: req/s", "x sync", "p99 ms", "errors", "RSS MB"]
    last = scenarios[-1]
    header += [f"RSS MB by role at {last.connections:,}", "(roles)"]
    rows = []
    panels = [Panel(c.title, "2xx responses/s (median)", []) for c in scenarios]
    memory = Panel(f"resident memory, {last.connections:,} connections",
                   "MB, every process of the server (summed RSS)", [])
    for server in shown:
        row = [server.title]
        for scenario, panel in zip(scenarios, panels, strict=True):
            cell = _cell(table, server.name, scenario.name)
            if not cell:
                row += ["-"] * 5
                continue
            more = cell["more"]
            row += [_fmt(more.get("ok_rps")),
                    _fmt(_more_ratio(table, server.name, REFERENCE, scenario.name, "ok_rps"), 2),
                    _fmt(cell["p99_ms"], 1), str(cell["errors"]) + _resets(cell["resets"]),
                    _fmt(more.get("rss_mb"))]
            panel.bars.append((server.title, more.get("ok_rps", 0.0), server.name))
        cell = _cell(table, server.name, last.name)
        row += [_roles_memory(cell, server) if cell else "-",
                "/".join(ROLE_ABBREVIATIONS[r] for r in _roles(server)
                         if r not in ("loadgen", "other"))]
        if cell and "rss_mb" in cell["more"]:
            memory.bars.append((server.title, cell["more"]["rss_mb"], server.name))
        rows.append(row)
    limits = data.get("open_files") or {}
    threads = max(data["wrk_threads"], MANY_CONNECTIONS_THREADS)
    text = (f"hello with wrk holding {' and '.join(f'{c.connections:,}' for c in scenarios)} "
            f"keep-alive connections ({threads} wrk threads, {data['duration']:g} s). The "
            "benchmark raised its open-file limit, which the servers and wrk inherit, as far "
            f"as the machine allows: from {limits.get('soft_before', '?')} to "
            f"{limits.get('soft', '?')} (the hard limit, {limits.get('hard', '?')}). *req/s* "
            "counts the 2xx responses only; *errors* are the other answers (503 from a "
            "server that sheds load), connect errors and timeouts. *RSS MB*: the resident "
            "memory of every process of the server, summed (pages shared between processes "
            "count once in each), sampled 80 % into the run.")
    return _section("Many connections", text, header, rows, [*panels, memory], png, checks,
                    "connections")


def slowclients_section(table: dict, servers: list[Server], checks: list[Target],
                        png: Path, data: dict) -> list[str]:
    shown = [s for s in servers if _cell(table, s.name, "slowclients")]
    if not shown:
        return []
    header = ["server", "alone req/s", "beside req/s", "kept", "alone p99 ms",
              "beside p99 ms", "p99 x", "errors", "slowloris closed", "reader KB/s", "cut"]
    rows = []
    kept = Panel("the fast load's req/s beside the slow clients",
                 "% of its rate alone, same round (median)", [])
    latency = Panel("the fast load's p99 beside the slow clients", "ms (lower is better)", [],
                    log=True)
    for server in shown:
        cell = _cell(table, server.name, "slowclients")
        assert cell is not None
        more = cell["more"]
        answered = cell["rps"] > 0
        rows.append([server.title, _fmt(more.get("base_rps")), _fmt(cell["rps"]),
                     _fmt(more.get("kept_pct"), 0, " %"), _fmt(more.get("base_p99_ms"), 2),
                     _fmt(cell["p99_ms"], 2) if answered else "no answer",
                     _fmt(more.get("p99_x"), 2), str(cell["errors"]) + _resets(cell["resets"]),
                     f"{_fmt(more.get('loris_closed'))} of "
                     f"{_fmt(more.get('loris_connections'))}",
                     _fmt(more.get("reader_kb_s")), _fmt(more.get("reader_cut"))])
        kept.bars.append((server.title, more.get("kept_pct", 0.0), server.name))
        if answered:
            latency.bars.append((server.title, cell["p99_ms"], server.name))
    text = (f"The fast load (hello, wrk, {CONNECTIONS} keep-alive connections, "
            f"{data['duration']:g} s) beside benchmarks/slowclients.py: "
            f"{SLOWLORIS_CLIENTS} slowloris clients, each sending a request header one byte "
            "a second and never ending it (connecting again when the server closes it), and "
            f"{SLOW_READERS} slow readers, each reading 1 MB responses at "
            f"{SLOW_READ_RATE // 1024} KB/s through a small receive buffer; they start "
            f"{SLOW_CLIENTS_LEAD:g} s before the fast load. *alone*: the same server's hello "
            "run just before, in the same server start; *kept* and *p99 x*: beside over "
            "alone, per round, then the median. *slowloris closed*: connections the server "
            "closed, of those opened; *reader KB/s*: what each slow reader got per second "
            f"(at most {SLOW_READ_RATE // 1024}); *cut*: slow readers' connections cut "
            "mid-response.")
    return _section("Slow clients", text, header, rows, [kept, latency], png, checks,
                    "slowclients")


def slowmix_half_section(table: dict, servers: list[Server], checks: list[Target],
                         png: Path, data: dict) -> list[str]:
    scenario = SCENARIOS_BY_NAME["slowmix-half"]
    shown = [s for s in servers if _cell(table, s.name, scenario.name)]
    if not shown:
        return []
    header = ["server", "hello req/s", "asked req/s", "done req/s", "fast p50 ms",
              "fast p99 ms", "x sync's", "x Granian's", "slow p99 ms", "errors"]
    rows, bars = [], []
    for server in shown:
        cell = _cell(table, server.name, scenario.name)
        assert cell is not None
        more = cell["more"]
        rows.append([server.title, _fmt(more.get("base_rps")), _fmt(more.get("asked_rate")),
                     _fmt(cell["rps"]), _fmt(cell["p50_ms"], 2), _fmt(cell["p99_ms"], 2),
                     _fmt_ratio(_ratio(table, server.name, REFERENCE, scenario.name, "p99_ms")),
                     _fmt_ratio(_ratio(table, server.name, "granian", scenario.name, "p99_ms")),
                     _fmt(more.get("slow_p99_ms"), 0), str(cell["errors"])])
        bars.append((server.title, cell["p99_ms"], server.name))
    text = (f"benchmarks/slowmix.py (as in the slow mix above: open loop, 1 request in 100 "
            f"sleeps 1 s, latency from each request's due time) for {data['slow_duration']:g} "
            f"s at {100 * scenario.rate_share:.0f} % of each server's capacity for this mix "
            "(*asked*), over "
            f"{CONNECTIONS} connections plus two for each slow request in flight; *done* is "
            "what was answered per second. A slow request holds a worker thread for 1 s, so "
            "at R req/s the mix keeps R/100 threads asleep: a server that runs T requests at "
            "once (processes x threads: 2 for circus-wsgi and Gunicorn sync, "
            f"{GRANIAN_CONCURRENCY} for Granian's defaults) answers at most 100 x T req/s of "
            "it, and no more than its hello rate in the same server start; its capacity is "
            "the lower of the two. Where *done* falls short of *asked*, requests waited (for "
            "a connection, or in the server) and the latencies include that wait. The "
            "client is Python: at the highest rates it may itself fall behind (its CPU is "
            "the wrk column of the tables above).")
    return _section("The slow mix at real load", text, header, rows,
                    [Panel(scenario.title, "fast requests' p99 latency, ms (lower is better)",
                           bars, log=True)], png, checks, "slowmix-half")


def _profile_section(found: dict | None) -> list[str]:
    if not found:
        return ["No profile was taken in this run (``--profile always`` takes one; a full "
                "run takes one when a target is missed).", ""]
    lines = [f"circus-wsgi ({SERVERS_BY_NAME[found['server']].title}) under the hello "
             f"keep-alive load, {found['duration']:g} s per run. Raw files: "
             "benchmarks/results/RUN/profiles/ (py-spy's collapsed stacks, perf data and "
             "reports).", ""]
    clean = found.get("clean")
    if clean:
        lines += [f"**CPU per request, by thread** (a run without samplers, "
                  f"{_fmt(clean['rps'])} req/s). *main* is the thread running Python, "
                  "*zmq-io* is ZeroMQ's I/O thread, which moves every message of "
                  "mongrel2's handler sockets on mongrel2's side (the dispatcher speaks "
                  "ZeroMQ's wire protocol itself, and the workers talk to it without "
                  "ZeroMQ); for mongrel2, *main* is its event loop. Context "
                  "switches per request: voluntary (the process waited) and involuntary "
                  "(preempted: more runnable threads than cores).", ""]
        rows = []
        for role in ("mongrel2", "dispatcher", "workers"):
            kinds = clean["threads"].get(role)
            if not kinds:
                continue
            cpu = {k: v for k, v in kinds.items() if not k.startswith("ctx")}
            others = sum(v for k, v in cpu.items() if k not in ("main", "zmq-io"))
            rows.append([role, f"{1e6 * sum(cpu.values()):.1f}",
                         f"{1e6 * cpu.get('main', 0.0):.1f}",
                         f"{1e6 * cpu.get('zmq-io', 0.0):.1f}", f"{1e6 * others:.1f}",
                         f"{kinds.get('ctx-voluntary', 0):.2f}",
                         f"{kinds.get('ctx-involuntary', 0):.2f}"])
        lines += _rst_table(["process", "us/req", "main", "zmq-io", "other threads",
                             "ctx vol/req", "ctx invol/req"], rows) + [""]
    load = found.get("load", {})
    lines += [f"**Sampled run** ({_fmt(load.get('rps'))} req/s while sampled): py-spy at "
              "250 Hz on the dispatcher and on one worker (percentages of the samples in "
              "which the Python thread was running; idle waits are not sampled), perf at "
              "499 Hz on mongrel2 and, by shared object, on the dispatcher and the worker "
              "(all threads).", ""]
    for role in ("dispatcher", "workers"):
        info = found["targets"].get(role) or {}
        if "samples" not in info:
            lines += [f"{role}: no py-spy profile ({info.get('stderr', 'not sampled')!r}).", ""]
        else:
            total = max(1, info["samples"])
            lines += [f"**{role}**, py-spy ({info['samples']} samples): time *in* each "
                      "function (self) and *under* it (inclusive):", ""]
            rows = [[f"{100 * n / total:.1f} %", _short(name)] for name, n in info["self"][:12]]
            lines += _rst_table(["self", "function"], rows) + [""]
            rows = [[f"{100 * n / total:.1f} %", _short(name)]
                    for name, n in info["inclusive"] if not _is_boilerplate(name)][:14]
            lines += _rst_table(["inclusive", "function"], rows) + [""]
        if info.get("dsos"):
            lines += [f"**{role}**, perf by shared object (all threads):", ""]
            lines += _rst_table(["share", "object"],
                                [[f"{pct:.1f} %", dso] for pct, dso in info["dsos"][:8]]) + [""]
    mongrel2 = found["targets"].get("mongrel2", {})
    if mongrel2.get("top"):
        lines += ["**mongrel2**, perf (self time by object and symbol):", ""]
        rows = [[f"{pct:.1f} %", what[:80]] for pct, what in mongrel2["top"]]
        lines += _rst_table(["self", "object and symbol"], rows) + [""]
    return lines


#: The reading of the profiles (by a person: the numbers are regenerated on every
#: run, this text is not), put into the document after them.
FINDINGS = BENCH / "findings.rst"


def _short(frame: str) -> str:
    """``func (/path/site-packages/zmq/sugar/socket.py)`` -> ``func (zmq/sugar/socket.py)``."""
    match = re.match(r"(.*) \((.*)\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def _is_boilerplate(frame: str) -> bool:
    return any(part in frame for part in ("<module>", "runpy", "_run_code", "cli.py",
                                          "__main__", "_bootstrap"))


def _contention(data: dict) -> str:
    """One sentence on the machine's other work during the load runs."""
    other = [100 * r["cpu"].get("other", 0.0) / r["load_seconds"] for r in data["results"]]
    if not other:
        return "No load run."
    waited = [r.get("waited_for_quiet", 0.0) for r in data["results"]]
    return (f"Other work on the machine (jobs this benchmark cannot see, plus kernel time "
            f"not charged to a process) during the load runs: median "
            f"{statistics.median(other):.0f} %, max {max(other):.0f} % of a core. Before "
            f"each run the benchmark waited up to {data.get('quiet_wait', 0):g} s for it to "
            f"drop under {100 * QUIET_THRESHOLD:.0f} % (median wait "
            f"{statistics.median(waited):.1f} s).")


def _beside(png: Path, shape: str) -> Path:
    """A shape's plot: docs/benchmarks-SHAPE.png beside docs/benchmarks.png."""
    return png.with_name(f"{png.stem}-{shape}{png.suffix}")


def write_document(data: dict, doc: Path) -> None:
    env, table = data["environment"], summarize(data["results"])
    every_server = [SERVERS_BY_NAME[name] for name in data["servers"]]
    servers = [s for s in every_server if not s.variant_of]  # the defaults shape's apart
    scenarios = [SCENARIOS_BY_NAME[name] for name in data["scenarios"]
                 if name not in SHAPE_SCENARIOS]
    png = doc.with_suffix(".png")
    plot(table, scenarios, servers, png)
    checks = targets(table)
    held = [t for t in checks if t.state == "holds"]
    missed = [t for t in checks if t.state == "MISSED"]
    counted = [t for t in checks if t.state != "retired"]
    title = "Benchmarks"
    lines = [":orphan:", "", "..", "   Generated by benchmarks/run.py; do not edit: run it again.",
             "", title, "=" * len(title), "",
             "circus-wsgi against Gunicorn, Granian and Waitress, and against three "
             "ceilings (mongrel2 serving a static file; mongrel2 with Python handlers that "
             "do nothing; circus-wsgi's dispatcher with workers that do nothing), on one "
             "machine, in one interleaved run: "
             f"{data['rounds']} round(s), each starting every server in turn, loading it "
             "with every scenario and stopping it. Every number is the median over the "
             "rounds. Every server runs :mod:`benchmarks.apps` with 2 worker processes "
             "(Waitress: 1 process, 4 threads; it has no worker processes) and writes no "
             "access log (but in the defaults shape below).", "",
             "Command::", "", f"    {data['command']}", "",
             f"Load: wrk {env['versions']['wrk']}, {data['wrk_threads']} thread(s), "
             f"{CONNECTIONS} connections, {data['duration']:g} s per run after a "
             f"{data['warmup']:g} s warm-up per server start; the slow mix: "
             "benchmarks/slowmix.py, open loop at 80 req/s for "
             f"{data['slow_duration']:g} s, 1 request in 100 to a URL that sleeps 1 s, "
             "latency by kind from each request's due time.", "",
             "Machine", "-------", "",
             f"- {env['cpu']}, {env['cores']} cores, {env['memory_gb']} GB; {env['os']}, "
             f"Linux {env['kernel']}; Python {env['python']}; run {env['date']}.",
             "- The load generator shares the 2 cores with the server: its CPU is in the "
             "tables (the wrk column).",
             "- " + _contention(data),
             "- " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
             "Targets (issues 6 and 20)", "-------------------------", "",
             "Measured on ``circus-wsgi serve`` with the benchmark's options (dispatcher, "
             "threads 1, 2 workers, no access log; the defaults target: with its defaults) "
             "against the same run's peers. *issue*: the issue that set the target.", ""]
    rows = [[t.text, str(t.issue), _measured(t), t.state] for t in checks]
    lines += _rst_table(["target", "issue", "measured", "state"], rows) + [""]
    lines += [f"Retired: {t.text}, {t.retired}." for t in checks if t.retired]
    lines += [""] if any(t.retired for t in checks) else []
    if missed:
        lines += [f"**{len(held)} of {len(counted)} targets hold; these do not:** "
                  + "; ".join(t.text for t in missed) + ".", ""]
    elif len(held) == len(counted):
        lines += [f"All {len(counted)} targets hold.", ""]
    else:
        lines += [f"{len(held)} targets hold; the others were not measured in this run.", ""]
    if data.get("incidents"):
        lines += ["Incidents during the run (each one is in the numbers below):", ""]
        lines += [f"- {incident}" for incident in data["incidents"]] + [""]
    lines += ["Results", "-------", "", f".. image:: {png.name}", "   :width: 100%", "",
              "req/s is the median over rounds; *x sync* is the ratio to Gunicorn sync in "
              "the same run; p50/p99 are wrk's latency percentiles (medians over rounds). "
              "*CPU % of a core* is each role's CPU time (user + system, from psutil) over "
              "the run, in the order given by *(roles)*: m2 = mongrel2, disp = the "
              "dispatcher, workers = the worker processes, mgr = the managing processes "
              "(circusd, circusd-stats and the serve command; Gunicorn's and Granian's "
              "master), wrk = the load generator (wrk, or the slow-mix client), other = "
              "whatever else the machine ran meanwhile (a check that the run was alone). "
              "*Python us/req* is the dispatcher's and workers' CPU per request, in "
              "microseconds. *read errors*: wrk's reads that failed, i.e. connections "
              "reset or closed mid-response (mongrel2 resets each connection it closes "
              "after a static file, so its Connection: close row has one per request).", ""]
    for scenario in scenarios:
        lines += [scenario.title, "~" * len(scenario.title), ""]
        lines += scenario_table(table, scenario, servers) + [""]
    shapes = [*defaults_section(table, every_server, checks, _beside(png, "defaults")),
              *connections_section(table, servers, checks, _beside(png, "connections"), data),
              *slowclients_section(table, servers, checks, _beside(png, "slowclients"), data),
              *slowmix_half_section(table, servers, checks, _beside(png, "slowmix-half"),
                                    data)]
    if shapes:
        lines += ["Load shapes (issue 20)", "----------------------", "", *shapes]
    lines += ["Where the time goes", "-------------------", ""]
    lines += _profile_section(data.get("profile"))
    if FINDINGS.exists():
        lines += FINDINGS.read_text().rstrip("\n").splitlines() + [""]
    lines += ["Server command lines", "--------------------", ""]
    for server in every_server:
        if server.note:
            lines += [f"- {server.title}: {server.note}"]
            continue
        argv = [a.replace(sys.executable, ".venv/bin/python")
                .replace(str(BIN) + "/", ".venv/bin/").replace(str(ROOT), ".")
                for a in server.launch(8000).argv]
        lines += [f"- {server.title}: ``{shlex.join(argv)}``"]
    if data.get("serve_args"):
        lines += [f"- --serve-args, added to every circus-wsgi command: "
                  f"``{shlex.join(data['serve_args'])}``"]
    if data.get("mongrel2_settings"):
        lines += ["- --mongrel2-setting values: " + ", ".join(
            f"``{k}={v}``" for k, v in data["mongrel2_settings"].items())]
    lines += [""]
    doc.write_text("\n".join(lines))


# ---------------------------------------------------------------------------


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def with_baselines(scenarios: list[Scenario]) -> list[Scenario]:
    """The scenarios, each baseline that one needs added, baselines first."""
    names = {s.name for s in scenarios} | {s.baseline for s in scenarios if s.baseline}
    return [s for s in SCENARIOS if s.name in names and not s.baseline] + \
        [s for s in SCENARIOS if s.name in names and s.baseline]


def raise_open_files() -> dict[str, int]:
    """Raise this process's open-file limit (which the servers and clients inherit) as far
    as the machine allows: the soft limit to the hard one. Return both, before and after."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft_before": soft, "hard": hard, "soft": raised}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="hello only (keep-alive and close), one round, short runs")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 8; quick 4)")
    parser.add_argument("--slow-duration", type=float, default=15.0,
                        help="seconds of the slow mix (default 15)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds of warm-up after each server start, 0 for none "
                        "(default 2; quick 1)")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--quiet-wait", type=float, default=None,
                        help="before each load run, wait at most this many seconds for the "
                        "machine's other work to drop under a quarter of a core "
                        "(default 10; quick 3; 0 to never wait)")
    parser.add_argument("--servers", help="comma-separated subset of: "
                        + ", ".join(s.name for s in SERVERS + VARIANTS) + " (the last "
                        f"{len(VARIANTS)}: the defaults shape, not in --quick); or variants "
                        "for trying mongrel2 settings: "
                        + ", ".join(s.name for s in EXTRA_SERVERS))
    parser.add_argument("--mongrel2-setting", action="append", default=[], type=_key_value,
                        metavar="KEY=VALUE", help="a mongrel2 setting for the *-config "
                        "variants, e.g. disable.access_logging=1 (repeatable)")
    parser.add_argument("--scenarios", help="comma-separated subset of: "
                        + ", ".join(s.name for s in SCENARIOS))
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                        help="profile circus-wsgi after the rounds: when a target is missed "
                        "(auto, the default), always, or never")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--profile-server", default="circus-t1",
                        choices=[s.name for s in SERVERS + EXTRA_SERVERS
                                 if s.group is _circus_group])
    parser.add_argument("--doc", type=Path, help="the document to write (default: "
                        "docs/benchmarks.rst for a full run, the results dir for --quick)")
    parser.add_argument("--package-dir", type=Path, metavar="DIR",
                        help="run circus-wsgi's processes with the circus_wsgi package found "
                        "in DIR (e.g. an exported commit) instead of the checkout's")
    parser.add_argument("--serve-args", default="", metavar="ARGS",
                        help="more arguments for every circus-wsgi serve, e.g. "
                        "--serve-args='--prefetch 1' (one shell-quoted string)")
    parser.add_argument("--report", type=Path, metavar="RESULTS.json",
                        help="only rewrite the document from an earlier run's results")
    args = parser.parse_args(argv)

    if args.report:
        data = json.loads(args.report.read_text())
        doc = args.doc or ROOT / "docs" / "benchmarks.rst"
        write_document(data, doc)
        print(f"wrote {doc} and {doc.with_suffix('.png')}")
        return 0

    SERVE_ARGS[:] = shlex.split(args.serve_args)
    MONGREL2_SETTINGS.update(args.mongrel2_setting)
    if args.package_dir:
        PACKAGE_PATH[:] = [str(args.package_dir.resolve())]
        sys.path[:0] = PACKAGE_PATH  # the configs this process writes come from there too
    for tool in ("wrk", "mongrel2"):
        if not shutil.which(tool):
            sys.exit(f"run.py: {tool} is not installed (apt-get install {tool})")
    rounds = args.rounds or (1 if args.quick else 3)
    duration = args.duration or (4.0 if args.quick else 8.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    quiet_wait = args.quiet_wait if args.quiet_wait is not None else (3.0 if args.quick else 10.0)
    servers = [SERVERS_BY_NAME[n] for n in args.servers.split(",")] if args.servers \
        else [s for s in SERVERS if not (args.quick and s.name in NOT_QUICK)] + \
        ([] if args.quick else list(VARIANTS))
    names = args.scenarios.split(",") if args.scenarios else \
        (QUICK_SCENARIOS if args.quick else [s.name for s in SCENARIOS])
    scenarios = with_baselines([SCENARIOS_BY_NAME[n] for n in names])
    open_files = raise_open_files()

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = RESULTS / (stamp + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    command = ("python benchmarks/run.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip()
    print(f"{command}\nresults in {out.relative_to(ROOT)}", flush=True)
    started = time.monotonic()
    data = {"command": command, "environment": environment(), "rounds": rounds,
            "duration": duration, "slow_duration": args.slow_duration, "warmup": warmup,
            "wrk_threads": args.wrk_threads, "quiet_wait": quiet_wait,
            "mongrel2_settings": MONGREL2_SETTINGS, "serve_args": SERVE_ARGS,
            "open_files": open_files,
            "servers": [s.name for s in servers],
            "scenarios": [s.name for s in scenarios], "results": [], "incidents": [],
            "profile": None}
    data["results"] = run_rounds(servers, scenarios, rounds, duration, args.slow_duration,
                                 warmup, args.wrk_threads, quiet_wait, out,
                                 data["incidents"])
    checks = targets(summarize(data["results"]))
    missed = any(t.state == "MISSED" for t in checks)
    if args.profile == "always" or (args.profile == "auto" and missed and not args.quick):
        print(f"profiling circus-wsgi for {args.profile_seconds:g} s ...", flush=True)
        data["profile"] = profile(SERVERS_BY_NAME[args.profile_server], args.profile_seconds,
                                  args.wrk_threads, out)
    (out / "results.json").write_text(json.dumps(data, indent=1))
    doc = args.doc or (out / "benchmarks.rst" if args.quick else ROOT / "docs" / "benchmarks.rst")
    write_document(data, doc)
    print(f"\nwrote {doc} and {doc.with_suffix('.png')} in {time.monotonic() - started:.0f} s\n")
    for check in checks:
        print(f"  {check.state:12} {check.text}: "
              f"{_fmt(check.value, 2 if check.unit == 'x' else 1, ' ' + check.unit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
