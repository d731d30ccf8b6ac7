"""The operator's view on the real stack: the Prometheus endpoint and autoscaling."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.request

import psutil
from prometheus_client.parser import text_string_to_metric_families

from harness import free_port, wait_for
from test_chaos import NO_FLAPPING, Circus
from test_serve import scratch, serving, start_serve


def get(port: int, path: str, timeout: float = 10.0) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        reply = connection.getresponse()
        reply.read()
        return reply.status
    finally:
        connection.close()


def scrape(port: int, token: str = "") -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as reply:
        text = reply.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def counts_by_status(families: dict) -> dict[str, float]:
    counts: dict[str, float] = {}
    for sample in families["http_server_request_duration_seconds"].samples:
        if sample.name.endswith("_count"):
            status = sample.labels["http_response_status_code"]
            counts[status] = counts.get(status, 0) + sample.value
    return counts


def test_a_scrape_counts_exactly_what_the_stack_answered() -> None:
    port = free_port()
    with serving("--workers", "2", "--access-log", "", "--metrics", str(port),
                 "--queue-timeout", "1", *NO_FLAPPING, app="chaos_app:app") as served:
        assert f"Metrics: http://127.0.0.1:{port}/metrics" in served.output()
        before = counts_by_status(scrape(port))
        statuses = [get(served.port, "/fast?t=x") for _ in range(20)]
        statuses += [get(served.port, "/status?code=404") for _ in range(5)]
        statuses.append(get(served.port, "/die"))  # a crashing app: 502
        circus = Circus(served.endpoint)
        assert circus.call("stop", name="workers", waiting=True)["status"] == "ok"
        statuses.append(get(served.port, "/fast?t=y"))  # no worker: 503 after queue_timeout
        assert statuses == [200] * 20 + [404] * 5 + [502, 503]
        after = counts_by_status(scrape(port))
        sent = {"200": 20, "404": 5, "502": 1, "503": 1}
        assert {s: after.get(s, 0) - before.get(s, 0) for s in sent} == sent
        families = scrape(port)
        reasons = {(s.labels["status"], s.labels["reason"]): s.value
                   for s in families["circus_wsgi_dispatcher_responses"].samples}
        assert reasons[("502", "worker exited")] == 1
        assert reasons[("503", "no worker took it in queue_timeout")] == 1
        [metrics_pid] = circus.pids("metrics")
        listening = [c.laddr for c in psutil.Process(metrics_pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]


def test_with_a_token_a_scrape_must_carry_it() -> None:
    port = free_port()
    with serving("--metrics", f"127.0.0.1:{port}", "--metrics-token", "s3cret",
                 "--access-log", "", app="chaos_app:app") as served:
        try:
            scrape(port)
            raise AssertionError("a scrape without the token was answered")
        except urllib.error.HTTPError as error:
            assert error.code == 401
        assert "circus_wsgi_workers" in scrape(port, "s3cret")
        run_dir = served.directory / "run"
        assert (run_dir / "metrics.token").stat().st_mode & 0o077 == 0
        for process in psutil.Process(served.process.pid).children(recursive=True):
            assert "s3cret" not in " ".join(process.cmdline())  # serve's own is the user's


class Load:
    """``clients`` threads in closed loops of one path, each request's status kept."""

    def __init__(self, port: int, path: str, clients: int) -> None:
        self.port, self.path = port, path
        self.statuses: list[int | str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True)
                        for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.statuses.append(get(self.port, self.path))
            except OSError as error:
                self.statuses.append(type(error).__name__)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)


def test_a_load_step_scales_the_workers_up_to_4_and_back_down_to_1() -> None:
    metrics = free_port()
    with serving("--workers-min", "1", "--workers-max", "4", "--scale-down-idle", "3",
                 "--metrics", str(metrics), "--access-log", "",
                 app="chaos_app:app") as served:
        circus = Circus(served.endpoint)
        wanted = lambda: circus.call("numprocesses", name="workers")["numprocesses"]  # noqa: E731
        assert wanted() == 1 and "(autoscaling 1 to 4)" in served.output()
        started = time.monotonic()
        load = Load(served.port, "/slow?s=0.2&t=load", 16)
        try:
            wait_for(lambda: wanted() == 4, 10, 0.1, "four workers under load")
            up_after = time.monotonic() - started
            wait_for(lambda: len(circus.pids("workers")) == 4, 10, 0.1, "them running")
            time.sleep(2)
        finally:
            load.stop()
        assert len(load.statuses) > 50 and set(load.statuses) == {200}
        stopped = time.monotonic()
        wait_for(lambda: wanted() == 1, 15, 0.1, "one worker once idle")
        down_after = time.monotonic() - stopped
        families = scrape(metrics)
        events = {(s.labels["direction"], s.labels["reason"]): s.value
                  for s in families["circus_wsgi_scale_events"].samples}
        ups = sum(n for (direction, _), n in events.items() if direction == "up")
        assert ups >= 2 and events[("down", "idle")] == 3  # 1 -> 2 -> 4, then 3, 2, 1
        assert families["circus_wsgi_workers_desired"].samples[0].value == 1
        decisions = [line for line in served.output().splitlines() if "autoscale: " in line]
        assert len(decisions) >= 5, served.output()[-3000:]
    print(f"up to 4 in {up_after:.1f} s, back to 1 in {down_after:.1f} s")


def test_a_crash_loop_stopped_by_flapping_is_not_restarted_by_the_autoscaler() -> None:
    with scratch() as directory:
        flag = directory / "crash"
        served = start_serve(directory, "--workers-min", "1", "--workers-max", "4",
                             "--env", f"SERVE_APPS_CRASH_FLAG={flag}",
                             "--flapping-max-retry", "0", "--queue-timeout", "1")
        try:
            circus = Circus(served.endpoint)
            flag.touch()  # the next import of the app fails: a bad deploy
            circus.call("restart", name="workers")
            wait_for(lambda: circus.call("status", name="workers")["status"] == "stopped",
                     20, 0.1, "flapping to stop the workers")
            load = Load(served.port, "/", 8)  # requests queue: pressure for the autoscaler
            try:
                for _ in range(20):
                    assert circus.call("status", name="workers")["status"] == "stopped"
                    assert not circus.pids("workers")
                    time.sleep(0.2)
            finally:
                load.stop()
            assert set(load.statuses) == {503}
        finally:
            served.process.stop(30)
