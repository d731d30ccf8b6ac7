"""docs/deployment.rst's production set-up, step by step, run as written.

Each step is a named code block of the page. The test takes the blocks from the page
and runs their commands, with only these things changed (:func:`substitute`): the paths
(``/srv/myapp``, ``/etc/...``, ``/var/log/myapp``) go into a directory of the test's,
port 443 becomes a free port under 1024 on 127.0.0.1, ``example.com`` is
``localhost`` with a certificate the test makes (trustme), the application is
tests/serve_apps.py, the user ``myapp`` is one the page's own ``useradd`` creates
under another name (removed afterwards), and logrotate keeps its state in the test's
directory. Where this machine cannot run a step (no systemd running, no registry for
circus-wsgi itself), :data:`NOT_RUN` says why, and what the test does instead. A new
step in the page that is neither run nor listed fails
:func:`test_every_step_is_run_or_says_why_not`.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import trustme

from circus_stack import Load
from doc_blocks import Block, named
from foreign_user import runtime
from harness import PROJECT_DIR, stop_circusd, wait_for
from test_privileges import privileged_port
from test_serve import kill_stack

PAGE = PROJECT_DIR / "docs" / "deployment.rst"
USER = "cw-deploy-test"
#: The steps the test runs, in the page's order.
RUN = ("deploy-user", "deploy-log-dir", "deploy-config", "deploy-unit", "deploy-check",
       "deploy-logrotate", "deploy-logrotate-run", "deploy-reload", "deploy-renew")
#: The steps it cannot run here, and what it does instead.
NOT_RUN = {
    "deploy-venv": "circus-wsgi is not fetched from a registry here: foreign_user.runtime "
                   "builds the same venv from the checkout, at the page's path",
    "deploy-start": "systemd is not PID 1 in this container: the unit is checked with "
                    "systemd-analyze verify and its ExecStart run as systemd would run it",
}
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@dataclass
class Deployment:
    root: Path  # /srv/myapp, and every other path of the page under it
    port: int  # for 443
    redirect: int  # for 80
    ca: trustme.CA
    steps: dict[str, Block]
    circusd: subprocess.Popen | None = None

    def substitute(self, text: str) -> str:
        for old, new in (
                ("/etc/letsencrypt/live/example.com", str(self.root / "letsencrypt")),
                ("/etc/systemd/system/myapp.service", str(self.root / "myapp.service")),
                ("/etc/logrotate.d/myapp", str(self.root / "logrotate.conf")),
                ("/var/log/myapp", str(self.root / "log")),
                ("/srv/myapp", str(self.root)),
                ("0.0.0.0:443", f"127.0.0.1:{self.port}"),
                ("0.0.0.0:80", f"127.0.0.1:{self.redirect}"),
                ("https://example.com/", f"https://localhost:{self.port}/"),
                ("http://example.com/", f"http://localhost:{self.redirect}/"),
                ("myapp.wsgi:application", "serve_apps:app"),
                ("logrotate ", f"logrotate --state {self.root / 'logrotate.state'} ")):
            text = text.replace(old, new)
        return re.sub(r"\bmyapp\b", USER, text)

    def file(self, step: str, path: str) -> Path:
        """Write the file a step shows to where the page says (substituted)."""
        target = Path(self.substitute(path))
        target.write_text(self.substitute(self.steps[step].body))
        return target

    def run(self, step: str) -> list[subprocess.CompletedProcess]:
        """Run a step's commands, one after the other; each must succeed."""
        results = []
        for command in self.steps[step].commands:
            argv = shlex.split(self.substitute(command))
            result = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 0, (argv, result.stdout, result.stderr)
            results.append(result)
        return results

    @property
    def env(self) -> dict[str, str]:
        """An operator's shell: no PYTHONPATH of the tests', sbin on PATH, and curl
        trusting the test's CA."""
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        return {**env, "PATH": SBIN_PATH, "CURL_CA_BUNDLE": str(self.root / "ca.pem")}

    def issue_certificate(self) -> bytes:
        """A new certificate for localhost where certbot keeps one; its DER."""
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        live = self.root / "letsencrypt"
        live.mkdir(mode=0o700, exist_ok=True)
        leaf.cert_chain_pems[0].write_to_path(str(live / "fullchain.pem"))
        leaf.private_key_pem.write_to_path(str(live / "privkey.pem"))
        (live / "privkey.pem").chmod(0o600)  # root's alone, as certbot writes it
        return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def served_certificate(self) -> bytes | None:
        """The certificate HTTPS serves now (None while it does not answer)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), 2) as raw:
                with self.context().wrap_socket(raw, server_hostname="localhost") as sock:
                    return sock.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            return None

    def endpoint_command(self, *args: str) -> str:
        circusctl = self.root / "venv" / "bin" / "circusctl"
        endpoint = f"ipc://{self.root}/deploy/run/circus.sock"
        result = subprocess.run([str(circusctl), "--endpoint", endpoint, *args], env=self.env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()


def _remove_user() -> None:
    subprocess.run(["userdel", USER], env={"PATH": SBIN_PATH}, capture_output=True,
                   timeout=30)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """Steps 1 to 5 of the page, then the unit's ExecStart running."""
    root = Path(tempfile.mkdtemp(prefix="cw-srv-", dir="/tmp"))
    root.chmod(0o755)
    _remove_user()  # left by a run that was killed
    port = privileged_port()
    redirect = next(other for other in iter(privileged_port, None) if other != port)
    deployed = Deployment(root, port, redirect, trustme.CA(), named(PAGE))
    try:
        deployed.ca.cert_pem.write_to_path(str(root / "ca.pem"))
        deployed.issue_certificate()
        deployed.run("deploy-user")
        with runtime(root):  # step 2, from the checkout
            deployed.run("deploy-log-dir")
            deployed.run("deploy-config")
            unit = deployed.file("deploy-unit", "/etc/systemd/system/myapp.service")
            deployed.circusd = start_unit(unit, deployed)
            yield deployed
    finally:
        if deployed.circusd is not None:
            stop_circusd(deployed.circusd, 45)  # systemd's KillMode=mixed: circusd alone
        kill_stack(root)
        _remove_user()
        shutil.rmtree(root, ignore_errors=True)


def start_unit(unit: Path, deployed: Deployment) -> subprocess.Popen:
    """Check the unit as systemd would read it, then run its ExecStart."""
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                                text=True, timeout=60)
        assert (verify.returncode, verify.stderr) == (0, ""), verify.stderr
    service = configparser.ConfigParser(interpolation=None)
    service.read_string(unit.read_text())
    log = open(deployed.root / "journal.log", "wb")  # what journald would get
    circusd = subprocess.Popen(shlex.split(service["Service"]["ExecStart"]), stdout=log,
                               stderr=subprocess.STDOUT, env=deployed.env, cwd="/")
    log.close()
    try:
        wait_for(lambda: circusd.poll() is not None or deployed.served_certificate(), 30,
                 0.1, "the stack to serve HTTPS")
        assert circusd.poll() is None, (deployed.root / "journal.log").read_text()[-3000:]
    except BaseException:
        stop_circusd(circusd, 45)
        raise
    return circusd


def test_every_step_is_run_or_says_why_not() -> None:
    steps = [name for name in named(PAGE) if name.startswith("deploy-")]
    assert sorted(steps) == sorted([*RUN, *NOT_RUN])
    text = PAGE.read_text()
    for name in NOT_RUN:  # the page says so too, just before the block
        at = text.index(f":name: {name}")
        assert "not run by the tests" in text[at - 400:at], name


def test_the_stack_serves_https_as_the_user(deployment: Deployment) -> None:
    [check_head, check_redirect, check_status] = deployment.run("deploy-check")
    assert check_head.stdout.startswith("HTTP/1.1 200"), check_head.stdout
    assert check_redirect.stdout.startswith("HTTP/1.1 301"), check_redirect.stdout
    assert f"Location: https://localhost:{deployment.port}/\n" in check_redirect.stdout
    assert '"idle_workers": 4' in check_status.stdout, check_status.stdout
    circusd = psutil.Process(deployment.circusd.pid)
    children = circusd.children()
    assert circusd.uids().real == 0 and len(children) == 9  # 4 workers, the redirect
    uid = int(subprocess.run(["id", "-u", USER], capture_output=True, text=True).stdout)
    assert {child.uids().real for child in children} == {uid}


def test_logrotate_rotates_the_access_log_while_the_workers_write_it(
        deployment: Deployment) -> None:
    conf = deployment.file("deploy-logrotate", "/etc/logrotate.d/myapp")
    conf.chmod(0o644)
    log = deployment.root / "log" / "access.log"
    for _ in range(3):
        deployment.run("deploy-check")  # curl: a request, a line
    wait_for(lambda: log.exists() and log.read_text().count("HEAD / ") >= 3, 10, 0.05,
             "the access log lines")
    before = log.read_text()
    dry, forced = deployment.run("deploy-logrotate-run")
    assert f"considering log {log}" in dry.stderr and "error" not in dry.stderr, dry.stderr
    rotated = deployment.root / "log" / "access.log.1"
    assert rotated.read_text().startswith(before) and log.stat().st_size < len(before)
    deployment.run("deploy-check")
    wait_for(lambda: "HEAD / " in log.read_text(), 10, 0.05, "a line in the new log")
    assert "\0" not in log.read_text()  # appended from the start, no hole where it was


def test_reload_replaces_every_worker_with_no_failed_request(deployment: Deployment
                                                             ) -> None:
    before = set(deployment.endpoint_command("list", "workers").split(","))
    with Load(deployment.port, ["/"] * 4, context=deployment.context()) as load:
        time.sleep(0.5)
        deployment.run("deploy-reload")
        wait_for(lambda: not set(deployment.endpoint_command("list", "workers").split(","))
                 & before, 30, 0.2, "every worker replaced")
        time.sleep(0.5)
    assert len(load.outcomes) > 50 and load.failures() == [], load.failures()[:5]
    assert len(deployment.endpoint_command("list", "workers").split(",")) == 4


def test_a_renewed_certificate_is_served_after_config_and_a_mongrel2_restart(
        deployment: Deployment) -> None:
    old = deployment.served_certificate()
    new = deployment.issue_certificate()
    assert old is not None and new != old
    deployment.run("deploy-config")
    assert deployment.served_certificate() == old  # read only at start
    deployment.run("deploy-renew")
    wait_for(lambda: deployment.served_certificate() == new, 30, 0.1,
             "the renewed certificate")
