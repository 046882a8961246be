"""Our own Prometheus metrics, through Ray Serve's metrics API.

Ray's metrics agent (one per node, ``METRICS_EXPORT_PORT``) exports them beside vLLM's
engine metrics (``ray_vllm_*``, :mod:`cloudllm_serve.engine.vllm_engine`) and Ray
Serve's own (``ray_serve_*``). Prometheus conventions: names start with ``cloudllm_``
(Ray adds ``ray_``), durations are in seconds, counters get ``_total`` (Ray adds it),
and every label has a bounded set of values: API, route template, status, reason,
operation, token kind, tenant (from the key file: a bounded set; left out with
``METRICS_TENANT_LABELS=false``). Never an id.

Serve adds ``deployment``, ``replica`` and ``application`` labels. Outside a Ray
worker (tests of the HTTP layer) the metrics only count in memory, in
:attr:`Metric.totals`, which those tests read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

#: Histogram buckets for request durations and time to first token (seconds).
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: Histogram buckets for conversation-store operations (seconds).
STORE_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0,
)  # fmt: skip


def _ray_metrics() -> Any:
    """Ray Serve's metrics module when this process is a Ray worker, else ``None``."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.serve import metrics
    except Exception:  # Ray missing or broken: count in memory only
        return None
    return metrics


class Metric:
    """A counter or histogram: Ray's when in a Ray worker, and always counted in memory."""

    def __init__(
        self,
        kind: str,
        name: str,
        description: str,
        tag_keys: Sequence[str],
        boundaries: Sequence[float] = (),
        *,
        export: bool = True,
    ) -> None:
        self.name = name
        self.tag_keys = tuple(tag_keys)
        #: Sum of values by tags (counters: the count; histograms: the observed sum).
        self.totals: dict[tuple[str, ...], float] = defaultdict(float)
        #: Observations by tags (histograms).
        self.counts: dict[tuple[str, ...], int] = defaultdict(int)
        self._histogram = kind == "histogram"
        self._ray: Any = None
        metrics = _ray_metrics() if export else None
        if metrics is not None:
            if self._histogram:
                self._ray = metrics.Histogram(
                    name, description, boundaries=list(boundaries), tag_keys=self.tag_keys
                )
            else:
                self._ray = metrics.Counter(name, description, tag_keys=self.tag_keys)

    def _key(self, tags: dict[str, str]) -> tuple[str, ...]:
        return tuple(tags.get(key, "") for key in self.tag_keys)

    def add(self, value: float = 1.0, **tags: str) -> None:
        """Count ``value`` (a counter) or observe it (a histogram)."""
        key = self._key(tags)
        self.totals[key] += value
        self.counts[key] += 1
        if self._ray is not None:
            full = dict(zip(self.tag_keys, key, strict=True))
            if self._histogram:
                self._ray.observe(value, tags=full)
            else:
                self._ray.inc(value, tags=full)

    def start_at_zero(self, **tags: str) -> None:
        """Export this counter's series for ``tags`` at 0 before anything is counted.

        Prometheus' advice for label values known in advance: a rate over a series that
        exists is 0, over one that does not is no data (a dashboard panel left blank).
        Ray's public ``inc`` refuses 0, so this records through its ``_record``.
        """
        key = self._key(tags)
        self.totals[key] += 0.0
        record = getattr(self._ray, "_record", None)
        if record is not None and not self._histogram:
            record(0, tags=dict(zip(self.tag_keys, key, strict=True)))

    def total(self, **tags: str) -> float:
        """The in-memory total over every tag set matching ``tags``."""
        return sum(
            value
            for key, value in self.totals.items()
            if all(key[self.tag_keys.index(k)] == v for k, v in tags.items())
        )


class IngressMetrics:
    """Everything one ingress replica measures (see the module docstring)."""

    def __init__(self, *, export: bool = True, tenant_labels: bool = True) -> None:
        """``export``: hand the values to Ray's metrics agent (in a Ray worker).

        ``tenant_labels`` (``METRICS_TENANT_LABELS``): label the token counter by tenant.
        """

        def metric(*args: Any) -> Metric:
            return Metric(*args, export=export)

        self.requests = metric(
            "counter",
            "cloudllm_requests",
            "HTTP requests answered, by API (seed, openai, other), route template and status",
            ("api", "route", "status"),
        )
        self.request_duration = metric(
            "histogram",
            "cloudllm_request_duration_seconds",
            "time from a request's arrival to its answer's last byte, by API and route",
            ("api", "route"),
            LATENCY_BUCKETS_S,
        )
        self.time_to_first_token = metric(
            "histogram",
            "cloudllm_time_to_first_token_seconds",
            "streamed requests: from arrival at the ingress to the first token leaving it",
            ("api",),
            LATENCY_BUCKETS_S,
        )
        self.store_duration = metric(
            "histogram",
            "cloudllm_store_operation_duration_seconds",
            "conversation-store (Redis) operations, by operation",
            ("operation",),
            STORE_BUCKETS_S,
        )
        self.store_errors = metric(
            "counter",
            "cloudllm_store_errors",
            "conversation-store operations that failed (Redis unavailable), by operation",
            ("operation",),
        )
        self.refusals = metric(
            "counter",
            "cloudllm_refusals",
            "requests refused by reason: queue_full, deadline, late, tenant_share, "
            "timeout, rate_limit, auth",
            ("reason",),
        )
        self.tokens = metric(
            "counter",
            "cloudllm_tokens",
            "tokens of answered requests by kind (prompt, completion)"
            + (" and tenant" if tenant_labels else ""),
            ("kind", "tenant") if tenant_labels else ("kind",),
        )
        self.affinity = metric(
            "counter",
            "cloudllm_affinity_routing",
            "turns of stored conversations by whether the engine replica of the previous "
            "turn answered (hit) or another one (miss)",
            ("outcome",),
        )
        self.dropped_history = metric(
            "counter",
            "cloudllm_dropped_history_messages",
            "stored messages left out of prompts to fit the context",
            ("api",),
        )
        self.engine_retries = metric(
            "counter",
            "cloudllm_engine_retries",
            "requests tried again on another engine replica because the engine of theirs "
            "died before it answered",
            (),
        )
        self.engine_retries.start_at_zero()
        self.stream_resumes = metric(
            "counter",
            "cloudllm_stream_resumes",
            "engine replicas that died under a request that had sent something, by outcome: "
            "resumed (continued on another replica), not_resumable, exhausted (no try left)",
            ("outcome",),
        )
        for outcome in ("resumed", "not_resumable", "exhausted"):
            self.stream_resumes.start_at_zero(outcome=outcome)
        for reason in REFUSAL_REASONS:
            self.refusals.start_at_zero(reason=reason)
        for outcome in ("hit", "miss"):
            self.affinity.start_at_zero(outcome=outcome)
        for api in ("seed", "openai"):
            self.dropped_history.start_at_zero(api=api)


#: Reasons of ``cloudllm_refusals_total`` (all exported from the start, at 0).
REFUSAL_REASONS = (
    "queue_full",
    "deadline",
    "late",
    "tenant_share",
    "timeout",
    "rate_limit",
    "auth",
)


def api_of(path: str) -> str:
    """The API a request path belongs to (a label value)."""
    if path.startswith("/v1/"):
        return "openai"
    if path in ("/generate", "/vision", "/multimodal", "/health", "/status/detailed") or (
        path.startswith("/conversations")
    ):
        return "seed"
    return "other"
