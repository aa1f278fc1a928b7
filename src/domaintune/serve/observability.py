"""Prometheus metrics (one registry per server instance) and structured JSON logs with a request id."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
MODEL_LABELS = ("model", "adapter", "version")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "domaintune_requests",
            "Requests by model, adapter, version, endpoint and HTTP status.",
            MODEL_LABELS + ("endpoint", "status"),
            registry=r,
        )
        self.prompt_tokens = Counter("domaintune_prompt_tokens", "Prompt tokens processed.", MODEL_LABELS, registry=r)
        self.completion_tokens = Counter(
            "domaintune_completion_tokens", "Completion tokens generated.", MODEL_LABELS, registry=r
        )
        self.ttft = Histogram(
            "domaintune_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            MODEL_LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "domaintune_request_latency_seconds",
            "End-to-end request latency.",
            MODEL_LABELS + ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "domaintune_errors",
            "Errors by model and error type (HTTP errors, timeouts, empty/malformed outputs).",
            MODEL_LABELS + ("type",),
            registry=r,
        )
        self.queue_depth = Gauge("domaintune_queue_depth", "Requests waiting for the generation engine.", registry=r)
        self.in_flight = Gauge("domaintune_requests_in_flight", "Requests being handled now.", registry=r)
        self.batch_size = Histogram(
            "domaintune_batch_size",
            "Requests decoded together per batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.canary_state = Gauge(
            "domaintune_canary_state", "Canary state: 1 running, 2 rolled back, 3 promoted.", ("model",), registry=r
        )
        self.canary_requests = Counter(
            "domaintune_canary_requests",
            "Canary requests by arm and outcome.",
            ("model", "arm", "outcome"),
            registry=r,
        )
        self.canary_rollbacks = Counter(
            "domaintune_canary_rollbacks", "Automatic or manual canary rollbacks.", ("model", "version"), registry=r
        )
        self.canary_promotions = Counter(
            "domaintune_canary_promotions", "Canary promotions.", ("model", "version"), registry=r
        )
        self.canary_decision = Gauge(
            "domaintune_canary_decision",
            "The canary's last decision (value 1) and its reason; read back from the store after a restart.",
            ("model", "decision", "candidate_version", "reason"),
            registry=r,
        )
        self.feedback = Counter(
            "domaintune_feedback", "Feedback ratings received.", MODEL_LABELS + ("rating",), registry=r
        )
        self.models_loaded = Gauge("domaintune_models_loaded", "Models served now.", registry=r)
        self.auth_failures = Counter(
            "domaintune_auth_failures",
            "Refused API key checks by reason (missing, malformed, unknown_key, wrong_secret, revoked, throttled, busy).",
            ("reason",),
            registry=r,
        )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and any `extra` fields."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            payload["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in self._skip and key not in payload and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def configure_json_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("domaintune", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
