"""Prometheus metrics of the service (docs/design.md §10): seconds, 1 ms-10 s buckets, no user/item labels.

These names are a contract: the Grafana dashboard, the HPA and the k8s/compose checks read them, and a
test asserts every dashboard query names a metric defined here.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["LATENCY_BUCKETS", "STAGES", "Metrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STAGES = ("redis", "subr", "crm", "prompt", "queue_wait", "model", "total")


class Metrics:
    """All service metrics on one registry (a fresh registry per app keeps tests independent)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "rellax_request_duration_seconds", "End-to-end request latency.",
            ["endpoint", "status_class"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "rellax_stage_duration_seconds", "Latency of one stage of the scoring path.",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "rellax_batch_size", "Candidates per model batch.", buckets=SIZE_BUCKETS, registry=r
        )
        self.candidates = Histogram(
            "rellax_candidates_per_request", "Candidates per scoring request.",
            ["endpoint"], buckets=SIZE_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("rellax_queue_depth", "Candidates waiting for the model.", registry=r)
        self.inflight = Gauge(
            "rellax_inflight_requests", "/v1 requests being handled now (not probes or /metrics).", registry=r
        )
        self.requests = Counter(
            "rellax_requests", "Requests answered.", ["endpoint", "status_class"], registry=r
        )  # exported as rellax_requests_total
        self.degraded = Counter(
            "rellax_degraded_responses", "Responses scored by the DIN fallback.", ["endpoint"], registry=r
        )  # rellax_degraded_responses_total
        self.errors = Counter(
            "rellax_errors", "Errors by reason.", ["reason"], registry=r
        )  # rellax_errors_total
        self.rate_limited = Counter(
            "rellax_rate_limited", "Requests refused with 429, by key id (anonymous with auth off).",
            ["key_id"], registry=r,
        )  # fmt: skip  # rellax_rate_limited_total; one series per configured key at most
        self.rerank_duration = Histogram(
            "rellax_rerank_duration_seconds", "/v1/rerank latency inside the service, by strategy.",
            ["strategy"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.scored = Counter(
            "rellax_candidates_scored", "Candidates scored, by model: rellax (the LLM), llmsrec (dot "
            "products after one user pass), din (the degraded fallback).", ["model"], registry=r,
        )  # fmt: skip  # rellax_candidates_scored_total
        self.cold_starts = Counter(
            "rellax_cold_starts", "Requests for users with no stored history.", registry=r
        )  # rellax_cold_starts_total
