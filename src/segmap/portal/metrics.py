"""The portal's Prometheus metrics (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

#: Latency buckets, seconds: from a warm request's overhead to a long CPU inference.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("segmap_portal_requests", "Inference requests answered, by model and HTTP status",
                                ["model", "status"], registry=self.registry)
        self.seconds = Histogram("segmap_portal_request_seconds", "Inference request time by stage (queue, fetch, "
                                 "load, inference, write, store, total), seconds", ["model", "stage"],
                                 buckets=BUCKETS, registry=self.registry)
        self.slot_requests = Gauge("segmap_portal_slot_requests", "Requests admitted to a device slot (running or "
                                   "waiting)", ["slot"], registry=self.registry)
        self.http = Counter("segmap_portal_http_requests", "HTTP requests by route and status",
                            ["route", "status"], registry=self.registry)

    def observe(self, model: str, status: int, timings_s: dict[str, float]) -> None:
        self.requests.labels(model, str(status)).inc()
        for stage, seconds in timings_s.items():
            self.seconds.labels(model, stage).observe(seconds)

    def track_slot(self, slot) -> None:
        self.slot_requests.labels(slot.name).set_function(lambda: slot.admitted)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
