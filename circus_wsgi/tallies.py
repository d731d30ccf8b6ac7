"""Histograms the broker keeps for every request, cheap enough to keep always.

One observation is a dictionary look-up, a bisection and two additions. The
counts are per bucket (not cumulative) and the snapshot is plain JSON data:
:mod:`circus_wsgi.metrics` turns it into Prometheus histograms (cumulative,
``le`` buckets), the console into rates and percentiles. Label values are
bounded: a method that is not one of HTTP's is counted as ``_OTHER``, as
OpenTelemetry's HTTP conventions say.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

#: OpenTelemetry's advised buckets for http.server.request.duration, in seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0)
#: The methods counted under their own name (RFC 9110 and PATCH); any other is _OTHER.
KNOWN_METHODS = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE",
                                         b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")}


def method_label(method: bytes) -> str:
    """A request method as a label value: the method, or ``_OTHER``."""
    return KNOWN_METHODS.get(method, "_OTHER")


class Histogram:
    """Observations per key (a tuple of label values, bytes or text), per bucket."""

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts: dict[tuple, list[int]] = {}  # key -> count per bucket, +Inf last
        self.sums: dict[tuple, float] = {}

    def observe(self, key: tuple, value: float) -> None:
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = [0] * (len(self.bounds) + 1)
            self.sums[key] = 0.0
        counts[bisect_left(self.bounds, value)] += 1
        self.sums[key] += value

    def snapshot(self) -> dict[str, Any]:
        """``{"bounds": [...], "series": [[labels, counts, sum], ...]}``; label values
        given as bytes come out as text."""
        return {"bounds": list(self.bounds),
                "series": [[[_text(v) for v in key], list(counts), self.sums[key]]
                           for key, counts in self.counts.items()]}


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else value
