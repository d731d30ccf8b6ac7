"""The broker's histograms, and what the metrics endpoint makes of a snapshot."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from circus_wsgi.metrics import authorized, families
from circus_wsgi.monitor import Look, Process
from circus_wsgi.tallies import DURATION_BUCKETS, Histogram, method_label
from test_broker import make


def test_an_observation_lands_in_the_first_bucket_it_fits():
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(("GET", b"200"), value)
    [(labels, counts, total)] = histogram.snapshot()["series"]
    assert labels == ["GET", "200"] and counts == [2, 1, 1] and total == 3.65


def test_methods_are_bounded_label_values():
    assert [method_label(m) for m in (b"GET", b"PATCH", b"BREW", b"get")] == \
        ["GET", "PATCH", "_OTHER", "_OTHER"]


def test_the_broker_counts_every_answer_by_method_and_status_its_own_too():
    broker = make(max_queue=1)
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    broker.arrive(b"1", b"s", b"raw", 0.0, None, b"GET")
    broker.arrive(b"2", b"s", b"raw", 0.0, None, b"BREW")  # queued
    broker.arrive(b"3", b"s", b"raw", 0.0, None, b"POST")  # queue full: 503
    broker.dispatch(0.02)
    broker.output(b"A", [b"1"], [], 0.3, [b"404"])
    broker.dispatch(0.4)  # now 2
    broker.refused(413, "body over max_body_size", b"PUT")
    series = {tuple(labels): counts for labels, counts, _ in
              broker.snapshot(1.0)["durations"]["series"]}
    assert series[("GET", "404")][DURATION_BUCKETS.index(0.5)] == 1  # 0.3 s
    assert sum(series[("POST", "503")]) == 1 and sum(series[("PUT", "413")]) == 1
    waits = broker.snapshot(1.0)["waits"]["series"]
    assert [sum(counts) for _, counts, _ in waits] == [2]  # 1 and 2 were handed out


def snapshot_with(**changes) -> dict:
    broker = make()
    snapshot = broker.snapshot(0.0)
    snapshot.update({"scale_events": [["up", "queue", 2]], **changes})
    return snapshot


def scrape(look: Look) -> dict:
    """The families of a look, after a round trip through the text format."""
    registry = CollectorRegistry(auto_describe=False)

    class Once:
        def collect(self):
            return iter(families(look))

    registry.register(Once())
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_the_metric_names_and_labels_the_issue_names():
    broker = make()
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    broker.arrive(b"1", b"s", b"raw", 0.0, None, b"GET")
    broker.dispatch(0.0)
    broker.output(b"A", [b"1"], [], 0.01, [b"200"])
    snapshot = {**broker.snapshot(0.0), "scale_events": [["up", "queue", 2]],
                "decisions": []}
    look = Look(0.0, snapshot, {"workers": "active"}, {"workers": 3},
                [Process("workers", 1, 4242, 10.0, 50 << 20, 1.5),
                 Process("circusd-stats", 1, 4243, 10.0, 1, 1.0)])
    found = scrape(look)
    duration = found["http_server_request_duration_seconds"]
    counts = [s for s in duration.samples if s.name.endswith("_count")]
    assert [(s.labels, s.value) for s in counts] == [
        ({"http_request_method": "GET", "http_response_status_code": "200"}, 1.0)]
    assert {s.labels["le"] for s in duration.samples if s.name.endswith("_bucket")} == \
        {*(str(b) for b in DURATION_BUCKETS), "+Inf"}
    for name in ("http_server_active_requests", "circus_wsgi_queue_depth",
                 "circus_wsgi_queue_wait_seconds", "circus_wsgi_workers",
                 "circus_wsgi_workers_desired", "circus_wsgi_dispatcher_responses",
                 "circus_wsgi_process_resident_memory_bytes",
                 "circus_wsgi_process_cpu_seconds", "circus_wsgi_scale_events"):
        assert name in found, name
    states = {s.labels["state"]: s.value for s in found["circus_wsgi_workers"].samples}
    assert states == {"busy": 0.0, "idle": 1.0, "leaving": 0.0}
    assert found["circus_wsgi_remote_workers"].samples == []  # none on other hosts
    [memory] = found["circus_wsgi_process_resident_memory_bytes"].samples
    assert memory.labels == {"watcher": "workers", "wid": "1"} and memory.value == 50 << 20
    [scale] = found["circus_wsgi_scale_events"].samples
    assert scale.name == "circus_wsgi_scale_events_total" and \
        scale.labels == {"direction": "up", "reason": "queue"}
    assert found["circus_wsgi_workers_desired"].samples[0].value == 3


def test_workers_on_other_hosts_are_counted_by_host():
    broker = make()
    broker.worker_ready(b"A", 1, 1, 1, 0, 0.0)
    for pid, host in ((2, "192.0.2.2"), (3, "192.0.2.2"), (4, "192.0.2.3")):
        broker.worker_ready(b"r%d" % pid, pid, 1, 1, 0, 0.0, host=host)
    broker.arrive(b"1", b"s", b"raw", 0.0, None, b"GET")
    broker.arrive(b"2", b"s", b"raw", 0.0, None, b"GET")
    broker.dispatch(0.0)  # the local worker first, then a remote one
    look = Look(0.0, {**broker.snapshot(0.0), "scale_events": [], "decisions": []})
    samples = scrape(look)["circus_wsgi_remote_workers"].samples
    counts = {(s.labels["host"], s.labels["state"]): s.value for s in samples}
    assert counts == {("192.0.2.2", "busy"): 1.0, ("192.0.2.2", "idle"): 1.0,
                      ("192.0.2.3", "idle"): 1.0}, samples


def test_without_the_dispatcher_a_scrape_says_so_and_still_works():
    found = scrape(Look(0.0))
    assert found["circus_wsgi_dispatcher_up"].samples[0].value == 0


def call(app, path: str, authorization: str = "") -> tuple[str, bytes]:
    answer = {}

    def start_response(status, headers):
        answer["status"] = status

    environ = {"PATH_INFO": path, "HTTP_AUTHORIZATION": authorization}
    body = b"".join(app(environ, start_response))
    return answer["status"], body


def test_the_endpoint_answers_only_metrics_and_only_with_the_token():
    def metrics(environ, start_response):
        start_response("200 OK", [])
        return [b"metrics"]

    guarded = authorized(metrics, "s3cret")
    assert call(guarded, "/metrics", "Bearer s3cret") == ("200 OK", b"metrics")
    assert call(guarded, "/metrics", "Bearer wrong")[0].startswith("401")
    assert call(guarded, "/metrics")[0].startswith("401")
    assert call(guarded, "/other", "Bearer s3cret")[0].startswith("404")
    assert call(authorized(metrics, ""), "/metrics") == ("200 OK", b"metrics")
