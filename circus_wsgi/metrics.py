"""``circus-wsgi metrics``: GET /metrics in the Prometheus text format.

It runs as a circus watcher of its own (``metrics``), so it dies with the stack
and keeps HTTP off the dispatcher's loop: each scrape takes one look at the stack
(:mod:`circus_wsgi.monitor`) and prometheus_client renders it. The names follow
OpenTelemetry's HTTP semantic conventions in their Prometheus form; processes are
labelled by circus's ``wid``, never by pid. It listens only where :setting:`metrics`
says; with :setting:`metrics_token`, every scrape must carry
``Authorization: Bearer TOKEN`` (401 otherwise).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from .exits import EXIT_OK, EXIT_USAGE
from .httpserver import (address_url, bearer_matches, make_listener, read_token,
                         serve_until_killed, split_address)
from .lifeline import die_with_parent
from .monitor import Look, Monitor
from .settings import Settings

log = logging.getLogger("circus_wsgi.metrics")

#: The watchers whose processes are measured.
WATCHERS = ("mongrel2", "dispatcher", "workers")


class StackCollector(Collector):
    """Every metric, from one look at the stack per scrape."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        return iter(families(self.monitor.look()))


def families(look: Look) -> list[Metric]:
    """The metric families of one look."""
    out: list[Metric] = []
    up = GaugeMetricFamily("circus_wsgi_dispatcher_up",
                           "1 when the dispatcher answered this scrape, else 0")
    up.add_metric([], 1 if look.dispatcher is not None else 0)
    out.append(up)
    if look.dispatcher is not None:
        out += _dispatcher_families(look.dispatcher)
    desired = GaugeMetricFamily("circus_wsgi_workers_desired",
                                "Workers wanted: the autoscaler's count, else the configured one")
    if "workers" in look.wanted:
        desired.add_metric([], look.wanted["workers"])
    out.append(desired)
    memory = GaugeMetricFamily("circus_wsgi_process_resident_memory_bytes",
                               "Resident memory of each process of the stack",
                               labels=["watcher", "wid"])
    cpu = CounterMetricFamily("circus_wsgi_process_cpu_seconds",
                              "User and system CPU time of each process of the stack",
                              labels=["watcher", "wid"])
    for process in look.processes:
        if process.watcher in WATCHERS:
            labels = [process.watcher, str(process.wid)]
            memory.add_metric(labels, process.rss)
            cpu.add_metric(labels, process.cpu_seconds)
    return out + [memory, cpu]


def _dispatcher_families(snapshot: dict[str, Any]) -> list[Metric]:
    durations = _histogram(
        "http_server_request_duration_seconds",
        "Duration of HTTP server requests, from mongrel2's hand-over to the dispatcher "
        "to the end of the response (the stack's own 4xx and 5xx included)",
        ["http_request_method", "http_response_status_code"], snapshot["durations"])
    waits = _histogram("circus_wsgi_queue_wait_seconds",
                       "Time from a request's arrival to its hand-out to a worker", [],
                       snapshot["waits"])
    active = GaugeMetricFamily("http_server_active_requests",
                               "Requests received and not yet answered")
    active.add_metric([], snapshot["active"])
    depth = GaugeMetricFamily("circus_wsgi_queue_depth", "Requests waiting for a worker")
    depth.add_metric([], snapshot["queue"])
    workers = GaugeMetricFamily("circus_wsgi_workers", "Workers connected to the dispatcher",
                                labels=["state"])
    for state in ("busy", "idle", "leaving"):
        workers.add_metric([state], snapshot[f"{state}_workers"])
    remote = GaugeMetricFamily("circus_wsgi_remote_workers",
                               "Of those, workers on other hosts, by host",
                               labels=["host", "state"])
    by_host: dict[tuple[str, str], int] = {}
    for worker in snapshot["workers"].values():
        if worker["host"]:
            key = (worker["host"], worker["state"])
            by_host[key] = by_host.get(key, 0) + 1
    for (host, state), count in sorted(by_host.items()):
        remote.add_metric([host, state], count)
    responses = CounterMetricFamily(
        "circus_wsgi_dispatcher_responses",
        "Requests the stack answered itself (400, 413, 502, 503, 504) or closed",
        labels=["status", "reason"])
    for what, count in sorted(snapshot["failures"].items()):
        status, _, reason = what.partition(" ")
        responses.add_metric([status.rstrip(":"), reason], count)
    scale = CounterMetricFamily("circus_wsgi_scale_events", "The autoscaler's changes",
                                labels=["direction", "reason"])
    for direction, reason, count in snapshot.get("scale_events", ()):
        scale.add_metric([direction, reason], count)
    counters = [(name, CounterMetricFamily(f"circus_wsgi_requests_{name}", text))
                for name, text in (
                    ("handed_out", "Hand-outs of requests to workers"),
                    ("given_back", "Requests workers gave back unbegun"),
                    ("requeued", "Requests a dead worker held that went to another"),
                    ("replayed", "Of those, ones it had answered but not yet sent"))]
    for name, family in counters:
        family.add_metric([], snapshot[name])
    return [durations, waits, active, depth, workers, remote, responses, scale,
            *[family for _, family in counters]]


def _histogram(name: str, documentation: str, labels: list[str],
               data: dict[str, Any]) -> HistogramMetricFamily:
    """Prometheus's cumulative ``le`` buckets from the broker's per-bucket counts."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    bounds = [*(str(b) for b in data["bounds"]), "+Inf"]
    for label_values, counts, total in data["series"]:
        cumulative, buckets = 0, []
        for bound, count in zip(bounds, counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([str(v) for v in label_values], buckets, total)
    return family


def authorized(app: Callable, token: str) -> Callable:
    """``app`` behind a bearer token (none: open), answering only GET /metrics."""
    def guarded(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics here\n"]
        if token and not bearer_matches(environ, token):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", "Bearer")])
            return [b"send Authorization: Bearer TOKEN (the metrics_token setting)\n"]
        return app(environ, start_response)

    return guarded


def run_metrics(settings: Settings) -> int:
    """Entry point of ``circus-wsgi metrics``: serve until killed; the exit status."""
    die_with_parent()
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(message)s",
                        force=True)  # importing circus configured logging already
    if not settings.metrics or not settings.run_dir:
        print("circus-wsgi metrics: give --metrics [HOST:]PORT and --run-dir", file=sys.stderr)
        return EXIT_USAGE
    try:
        token = read_token(settings.metrics_token)
    except OSError as error:
        print(f"circus-wsgi metrics: metrics_token: {error}", file=sys.stderr)
        return EXIT_USAGE
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StackCollector(Monitor(settings)))
    server = make_listener(*split_address(settings.metrics),
                           authorized(make_wsgi_app(registry), token))
    log.info("metrics at %s/metrics", address_url(settings.metrics))
    serve_until_killed(server)
    return EXIT_OK
