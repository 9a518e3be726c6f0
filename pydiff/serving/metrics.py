"""The server's Prometheus metrics (prometheus_client), in a registry of their own per app."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_WINDOW_S = 60.0


class Metrics:
    """Queue depth, batch sizes, step and request latencies, images made, errors by kind."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth=lambda: 0):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("pydiff_queue_depth", "Requests waiting in the engine's queue", registry=r)
        self.queue_depth.set_function(queue_depth)
        self.batch_rows = Histogram(
            "pydiff_batch_size_rows", "Image rows per pipeline call", buckets=ROW_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "pydiff_batch_size_requests", "Requests per pipeline call", buckets=ROW_BUCKETS, registry=r
        )
        self.step_latency = Histogram(
            "pydiff_step_latency_seconds",
            "Seconds per sampling step (one network call and the fused step, all rows of the call)",
            ["model", "stage"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "pydiff_request_latency_seconds",
            "Seconds from a work request's arrival to its answer",
            ["endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.images = Counter("pydiff_images", "Images made", ["model"], registry=r)
        self.images_per_second = Gauge(
            "pydiff_images_per_second",
            f"Images made per second over the last {RATE_WINDOW_S:g} s",
            registry=r,
        )
        self.images_per_second.set_function(self._rate)
        self.errors = Counter("pydiff_errors", "Error answers, by kind", ["kind"], registry=r)
        self.requests = Counter(
            "pydiff_requests", "Answers, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self._lock = threading.Lock()
        self._made: collections.deque[tuple[float, int]] = collections.deque()

    # the engine's hooks
    def observe_call(self, rows: int, requests: int) -> None:
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def observe_step(self, model: str, stage: str, seconds: float) -> None:
        self.step_latency.labels(model, stage).observe(seconds)

    def observe_images(self, model: str, n: int) -> None:
        self.images.labels(model).inc(n)
        with self._lock:
            self._made.append((time.monotonic(), n))

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._made and self._made[0][0] < now - RATE_WINDOW_S:
                self._made.popleft()
            return sum(n for _, n in self._made) / RATE_WINDOW_S

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
