"""The web console on the real stack, in a real headless Chromium (tests/browser.py).

One ``circus-wsgi serve --console`` and one browser serve the tests of the page, which
run in file order and each start from what the stack is when they begin. The pids on
the page are compared with what the real ``circusctl`` lists. A stack started from
circus.ini (``circus-wsgi config``) has its own test, with ``circus-wsgi console``
attached to it by hand.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import psutil
import pytest

from browser import chromium
from circus_stack import CircusStack
from circus_wsgi.console import LOOK_EVERY
from harness import Process, free_port, python_env, wait_for
from test_chaos import NO_FLAPPING
from test_serve import CIRCUS_WSGI, Serve, scratch, serving, start_serve

#: The page must show a change this soon (the issue's bound).
SHOWN_WITHIN = 3.0


def console_url(output: str) -> str:
    match = re.search(r"^Console: (http://\S+/\?token=\S+)$", output, re.M)
    assert match, f"no Console line:\n{output[-3000:]}"
    return match.group(1)


class Console:
    """The console of a running stack, over plain HTTP."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.token = parts.query.partition("token=")[2]

    def request(self, method: str, path: str, headers: dict | None = None,
                body: Any = None) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            data = json.dumps(body).encode() if body is not None else None
            connection.request(method, path, data, headers or {})
            reply = connection.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            connection.close()

    def bearer(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def status(self) -> dict:
        code, _, body = self.request("GET", "/api/status", self.bearer())
        assert code == 200, body
        return json.loads(body)


@pytest.fixture(scope="module")
def served() -> Iterator[Serve]:
    port = free_port()
    with serving("--workers", "2", "--threads", "2", "--console", str(port),
                 "--access-log", "", *NO_FLAPPING, app="chaos_app:app") as served:
        served.console = Console(console_url(served.output()))
        yield served


@pytest.fixture(scope="module")
def browser(served: Serve) -> Iterator[Any]:
    with chromium() as driver:
        driver.get(console_url(served.output()))
        wait_for(lambda: page_pids(driver), 15, 0.05, "the page to list the workers")
        yield driver


def page_pids(driver) -> set[int]:
    """The pids in the page's table of workers."""
    return set(driver.execute_script(
        "return [...document.querySelectorAll('#workers tbody tr')]"
        ".map((row) => Number(row.dataset.pid))"))


def button(driver, label: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']")


def outcome(driver) -> str:
    return driver.execute_script("return document.getElementById('outcome').textContent")


def shown_within(condition, what: str) -> float:
    """Seconds until ``condition`` holds; fails past the issue's bound (3 s)."""
    started = time.monotonic()
    wait_for(condition, SHOWN_WITHIN, 0.05, what)
    return time.monotonic() - started


def mark_page(driver) -> None:
    driver.execute_script("window.notReloaded = true")


def assert_not_reloaded(driver) -> None:
    assert driver.execute_script("return window.notReloaded === true"), "the page reloaded"


def workers(served: Serve) -> set[int]:
    return served.pids("workers")


def stable_workers(served: Serve) -> set[int]:
    """circus's workers once their number is what circus wants."""
    wanted = int(served.circusctl("numprocesses", "workers"))
    return wait_for(lambda: (lambda pids: pids if len(pids) == wanted else None)(
        workers(served)), 30, 0.1, f"{wanted} workers")


# --------------------------------------------------------------------------
# The page


def test_the_url_logs_in_with_a_session_cookie_and_drops_the_token(served, browser) -> None:
    assert "token=" not in browser.current_url
    assert urlsplit(browser.current_url).path == "/"
    [cookie] = browser.get_cookies()
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["value"] != served.console.token
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: not to scripts
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []  # no CSP violation, no failed request


def test_the_page_lists_every_worker_pid_circusctl_gives(served, browser) -> None:
    pids = stable_workers(served)
    wait_for(lambda: page_pids(browser) == pids, 5, 0.05, f"the page to list {pids}")
    text = browser.find_element("id", "processes").text
    for pid in pids | served.pids("mongrel2") | served.pids("dispatcher"):
        assert str(pid) in text
    watchers = browser.find_element("id", "watchers").text
    assert "workers active 2 2" in watchers and "mongrel2 active 1 1" in watchers
    rows = browser.execute_script(
        "return [...document.querySelectorAll('#processes tbody tr')].map("
        "(r) => [...r.cells].map((c) => c.textContent))")
    for _, wid, pid, _, cpu, memory in rows:
        assert int(wid) >= 1 and int(pid) > 1 and memory.endswith(" MiB")
        assert cpu == "–" or float(cpu) >= 0


def test_add_worker_adds_one_that_circusctl_lists_and_the_page_shows(served, browser) -> None:
    before = stable_workers(served)
    mark_page(browser)
    clicked = time.monotonic()
    button(browser, "Add worker").click()
    new = wait_for(lambda: workers(served) - before, 10, 0.05, "circusctl to list a new worker")
    assert len(new) == 1
    shown_within(lambda: new <= page_pids(browser), f"the page to show worker {new}")
    assert time.monotonic() - clicked < SHOWN_WITHIN + 1
    assert "Add worker: one more worker: 3 wanted" in outcome(browser)
    assert_not_reloaded(browser)


def test_circusctl_decr_shows_on_the_page_without_a_reload(served, browser) -> None:
    before = stable_workers(served)
    mark_page(browser)
    served.circusctl("decr", "workers")
    after = wait_for(lambda: (lambda p: p if len(p) == len(before) - 1 else None)(
        workers(served)), 15, 0.05, "circusctl to list one worker fewer")
    seconds = shown_within(lambda: page_pids(browser) == after,
                           f"the page to list {after} (was {before})")
    assert_not_reloaded(browser)
    print(f"decr shown {seconds:.2f} s after circusctl listed it")


class Load:
    """Closed-loop clients on the stack's HTTP port."""

    def __init__(self, port: int, paths: list[str]) -> None:
        self.port, self.stopping, self.statuses = port, threading.Event(), []
        self.threads = [threading.Thread(target=self._loop, args=(path,), daemon=True)
                        for path in paths]
        for thread in self.threads:
            thread.start()

    def _loop(self, path: str) -> None:
        while not self.stopping.is_set():
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
            try:
                connection.request("GET", path)
                reply = connection.getresponse()
                reply.read()
                self.statuses.append(reply.status)
            except (OSError, http.client.HTTPException) as error:
                self.statuses.append(type(error).__name__)
            finally:
                connection.close()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(20)


def plot(driver, name: str) -> tuple[int, float | None]:
    """How many points the plot ``name`` draws, and its latest value."""
    points, latest = driver.execute_script(
        f"const s = document.querySelector('#plot-{name} svg');"
        "return s ? [Number(s.dataset.points), s.dataset.latest] : [0, ''];")
    return points, float(latest) if latest else None


def busy_with(driver, path: str) -> list[tuple[int, str, float]]:
    """(pid, request, seconds) of each request the page shows a busy worker running,
    whose text holds ``path``."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#workers tbody tr[data-state=busy]')]"
        ".flatMap((r) => [...r.querySelectorAll('.request')].map((q) => [Number(r.dataset.pid),"
        " q.textContent, q.querySelector('.seconds').textContent]))")
    return [(pid, request, float(seconds.split()[0])) for pid, request, seconds in rows
            if path in request]


def test_under_load_the_plots_and_a_busy_workers_request_show(served, browser) -> None:
    load = Load(served.port, ["/slow?s=3&t=stuck"] + ["/fast?t=load"] * 4)
    try:
        busy = wait_for(lambda: busy_with(browser, "GET /slow"), 10, 0.1,
                        "a worker shown running GET /slow")
        pid, request, seconds = busy[0]
        assert pid in workers(served) and 0 <= seconds <= 3.5
        wait_for(lambda: busy_with(browser, "GET /slow") and
                 max(s for _, _, s in busy_with(browser, "GET /slow")) >= 1.0, 5, 0.1,
                 "the page to count the slow request's seconds")
        rate = wait_for(lambda: (lambda p: p if p[0] >= 3 and (p[1] or 0) > 5 else None)(
            plot(browser, "rate")), 15, 0.2, "the request-rate plot to rise")
        latency_points, p99 = plot(browser, "latency")
        assert latency_points >= 2 and p99 is not None and p99 > 0
        assert float(browser.find_element("id", "rate-now").text) > 0
    finally:
        load.stop()
    assert set(load.statuses) == {200} and len(load.statuses) > 50
    print(f"rate plot: {rate[0]} points, latest {rate[1]:.0f} requests/s")


def test_stop_and_kill_a_chosen_worker(served, browser) -> None:
    from selenium.webdriver.common.by import By

    for verb, label in (("stop", "Stop"), ("kill", "Kill")):
        before = stable_workers(served)
        victim = min(before)
        wait_for(lambda: victim in page_pids(browser), 5, 0.05, f"{victim} on the page")
        row = browser.find_element(By.CSS_SELECTOR, f'#workers tr[data-pid="{victim}"]')
        row.find_element(By.XPATH, f".//button[normalize-space()='{label}']").click()
        wait_for(lambda: victim not in workers(served), 15, 0.05, f"{victim} to be {verb}ped")
        wait_for(lambda: f"{label} worker {victim}: worker {victim}" in outcome(browser), 5,
                 0.05, f"the page to confirm {verb}")
        after = stable_workers(served)
        assert len(after) == len(before) and victim not in after  # circus replaced it
        shown_within(lambda: page_pids(browser) == after, f"the page to list {after}")


def test_reload_and_restart_mongrel2_leave_the_console_up(served, browser) -> None:
    [console] = served.pids("console")
    old_workers = stable_workers(served)
    [old_mongrel2] = served.pids("mongrel2")
    button(browser, "Reload workers").click()
    wait_for(lambda: not (workers(served) & old_workers), 30, 0.1, "new workers for old")
    button(browser, "Restart mongrel2").click()
    wait_for(lambda: served.pids("mongrel2") - {old_mongrel2}, 30, 0.1, "a new mongrel2")
    new_workers = stable_workers(served)
    shown_within(lambda: page_pids(browser) == new_workers, "the page to list the new workers")
    assert served.pids("console") == {console}
    assert "Restart mongrel2: mongrel2 restarts" in outcome(browser)
    wait_for(lambda: served.get("/fast?t=again").status == 200, 10, 0.1, "mongrel2 serving")


def test_set_count(served, browser) -> None:
    from selenium.webdriver.common.keys import Keys

    count = browser.find_element("id", "worker-count")
    # As a user does: select what the field holds and type over it. (clear() would leave
    # the field, and a status arriving before the typing puts circus's count back: "23".)
    count.send_keys(Keys.CONTROL, "a")
    count.send_keys("3")
    browser.execute_script("document.activeElement.blur()")  # the operator looks elsewhere
    time.sleep(2.5 * LOOK_EVERY)  # two looks at the stack reach the page meanwhile
    assert count.get_attribute("value") == "3"  # what was typed stays until it is sent
    button(browser, "Set count").click()
    wait_for(lambda: "Set count to 3: " in outcome(browser), 15, 0.05, "the page to send 3")
    wait_for(lambda: len(workers(served)) == 3, 15, 0.05, "three workers")
    assert served.circusctl("numprocesses", "workers") == "3"
    shown_within(lambda: page_pids(browser) == workers(served), "the page to list them")


# --------------------------------------------------------------------------
# Security, over plain HTTP


def test_without_the_token_401_and_a_post_without_the_csrf_token_403(served) -> None:
    console = served.console
    for path in ("/", "/api/status", "/api/events", "/static/console.js"):
        code, headers, body = console.request("GET", path)
        assert code == 401, path
    assert b"?token=" in console.request("GET", "/")[2]  # the page says how to log in
    code, headers, _ = console.request("GET", f"/?token={console.token}")
    assert code == 303 and headers["Location"] == "/"
    session = {"Cookie": headers["Set-Cookie"].split(";")[0]}
    code, _, page = console.request("GET", "/", session)
    csrf = re.search(rb'name="csrf-token" content="([^"]+)"', page).group(1).decode()
    before = workers(served)
    assert console.request("POST", "/api/workers/add", session, {})[0] == 403
    assert console.request("POST", "/api/workers/add",
                           {**session, "X-CSRF-Token": csrf, "Origin": "http://evil.example"},
                           {})[0] == 403
    assert console.request("POST", "/api/workers/add", {"X-CSRF-Token": csrf}, {})[0] == 401
    time.sleep(0.5)
    assert workers(served) == before
    code, headers, _ = console.request("GET", "/api/status", session)
    assert code == 200 and headers["Cache-Control"] == "no-store"
    assert headers["X-Frame-Options"] == "DENY"
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"]


def test_a_script_steers_with_the_bearer_token(served) -> None:
    console = served.console
    status = console.status()
    assert {w["pid"] for w in status["workers"]} == stable_workers(served)
    assert {"queue", "completed", "failures"} <= set(status["dispatcher"])
    headers = {**console.bearer(), "X-CSRF-Token": status["csrf"]}
    code, _, body = console.request("POST", "/api/workers/count", headers, {"count": 2})
    assert code == 200 and json.loads(body)["ok"] is True
    wait_for(lambda: len(workers(served)) == 2, 15, 0.05, "two workers")
    code, _, body = console.request("POST", "/api/workers/1/kill", headers, {})
    assert code == 409 and "not one of circus's workers" in json.loads(body)["error"]


def test_the_console_listens_only_where_asked(served) -> None:
    [pid] = served.pids("console")
    listening = [(c.laddr.ip, c.laddr.port) for c in
                 psutil.Process(pid).net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert listening == [("127.0.0.1", served.console.port)]
    assert served.console.token not in " ".join(psutil.Process(pid).cmdline())


# --------------------------------------------------------------------------
# A stack started from circus.ini, and a console attached to it by hand


def test_a_console_attaches_to_a_stack_circusd_runs(tmp_path: Path) -> None:
    port = free_port()
    with CircusStack(workers=2, console=f"127.0.0.1:{port}") as stack:
        # the watcher of the config, with no token given, made one and printed its line
        wait_for(lambda: "Console: http://" in stack.log(), 15, 0.05, "the console's line")
        [console_pid] = stack.pids("console")
        watcher = Console(console_url(re.sub(r"^console\.\d+ \| ", "", stack.log(), flags=re.M)))
        assert watcher.port == port
        assert {w["pid"] for w in watcher.status()["workers"]} == set(stack.pids("workers"))
        token_file = tmp_path / "token"
        token_file.write_text("given-token\n")
        attached = Process([CIRCUS_WSGI, "console", "--run-dir", str(stack.path / "run"),
                            "--console-token", f"@{token_file}"], tmp_path / "console.log",
                           env=python_env())
        try:
            attached.wait_output("Console: http://127.0.0.1:", 15)
            by_hand = Console(console_url(attached.output()))
            assert by_hand.token == "given-token"
            status = wait_for(lambda: (lambda s: s if s.get("workers") else None)(
                by_hand.status()), 10, 0.1, "the attached console's first look")
            assert {w["pid"] for w in status["workers"]} == set(stack.pids("workers"))
            assert {w["name"] for w in status["watchers"]} >= {"mongrel2", "dispatcher",
                                                               "workers", "console"}
        finally:
            assert attached.stop(10) is not None
    assert wait_for(lambda: not psutil.pid_exists(console_pid), 10, 0.1,
                    "the console to die with the stack")


def test_the_flapping_plugins_decisions_show() -> None:
    with scratch() as directory:
        flag = directory / "crash"
        served = start_serve(directory, "--console", str(free_port()),
                             "--env", f"SERVE_APPS_CRASH_FLAG={flag}",
                             "--flapping-max-retry", "1", "--flapping-retry-in", "1")
        try:
            console = Console(console_url(served.output()))
            flag.touch()  # the next import of the app fails: a bad deploy
            served.circusctl("restart", "workers")

            def flapping() -> list[dict]:
                return [d for d in console.status()["decisions"] if d["by"] == "flapping"]
            wait_for(lambda: len(flapping()) == 3, 40, 0.2, "stop, retry and give up")
            decisions = flapping()
            assert [(d["action"], d["reason"]) for d in decisions] == [
                ("give up", "workers"), ("retry", "workers"), ("stop", "workers")]
            assert decisions[2]["detail"] == \
                "workers: crash loop: watcher stopped; retry 1 of 1 in 1s"
            assert decisions[0]["at"] > decisions[1]["at"] > decisions[2]["at"]
        finally:
            served.process.stop(30)


def test_the_console_command_says_what_it_needs() -> None:
    result = subprocess.run([CIRCUS_WSGI, "console"], capture_output=True, text=True,
                            timeout=30, env=python_env())
    assert result.returncode == 2
    assert result.stderr.strip() == "circus-wsgi console: give --run-dir of the running stack"
