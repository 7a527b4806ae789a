"""Prometheus metrics (one registry per Engine, so several apps in one process never collide)
and the per-request log context the access-log line is built from."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 300)
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
# HTTP methods that may become label values; anything else a client sends is counted as "other".
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "other"


def http_method_label(method: str) -> str:
    """The method as a bounded label value (raw client input never becomes a label)."""
    return method if method in KNOWN_METHODS else OTHER_METHOD


class ServiceMetrics:
    """Counters, gauges and histograms of one service instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sd_http_requests",
                                "HTTP requests by route template, method (unknown: other), status",
                                ["route", "method", "status"], registry=r)
        self.generation_seconds = Histogram("sd_generation_seconds",
                                            "Latency of accepted generation jobs, queue wait included",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("sd_queue_wait_seconds", "Time jobs waited for the NPU",
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("sd_npu_stage_seconds", "NPU time per model stage and job",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.images = Counter("sd_images_generated", "Images generated", registry=r)
        self.jobs = Counter("sd_jobs", "Jobs finished by outcome (ok, interrupted, failed)",
                            ["outcome"], registry=r)
        self.rejections = Counter("sd_rejections", "Requests refused or dropped, by reason",
                                  ["reason"], registry=r)
        self.queue_depth = Gauge("sd_queue_depth", "Jobs waiting for the NPU", registry=r)
        self.busy = Gauge("sd_worker_busy", "1 while an NPU worker runs a job", registry=r)
        self.device_up = Gauge("sd_device_up", "1 while the device serves (loaded, not lost)", ["device"],
                               registry=r)
        self.device_busy = Gauge("sd_device_busy", "1 while the device runs an image", ["device"], registry=r)
        self.device_images = Counter("sd_device_images", "Images run per device", ["device"], registry=r)
        self.device_failures = Counter("sd_device_failures", "Failed images per device", ["device"],
                                       registry=r)

    def bind_queue(self, depth: Callable[[], float], busy: Callable[[], float]) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.set_function(depth)
        self.busy.set_function(busy)

    def bind_device(self, index: int, up: Callable[[], float], busy: Callable[[], float]) -> None:
        """Per-device gauges read at scrape time; its counters start at 0."""
        label = str(index)
        self.device_up.labels(device=label).set_function(up)
        self.device_busy.labels(device=label).set_function(busy)
        self.device_images.labels(device=label)
        self.device_failures.labels(device=label)

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason=reason).inc()

    def observe_stages(self, stage_ms: dict[str, float]) -> None:
        for stage, ms in stage_ms.items():
            self.stage_seconds.labels(stage=stage).observe(ms / 1000.0)

    def exposition(self) -> bytes:
        """The Prometheus text format."""
        return generate_latest(self.registry)


# --- request log context -------------------------------------------------------------------------
# The access-log middleware puts a fresh dict here per request; lower layers add fields (task id,
# warnings, stage timings) with `note_request`. A dict is shared even when the context is copied.
REQUEST_LOG: ContextVar[dict[str, Any] | None] = ContextVar("request_log", default=None)


def note_request(**fields: Any) -> None:
    """Add fields to the current request's log line (no-op outside a request)."""
    record = REQUEST_LOG.get()
    if record is None:
        return
    for key, value in fields.items():
        if key == "warnings":
            record.setdefault("warnings", []).extend(value)
        else:
            record[key] = value
