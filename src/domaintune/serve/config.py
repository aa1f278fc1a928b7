"""The `serve:` section: which models to serve, how to batch, limits, canary rollout, feedback store."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from domaintune.hardware.autoselect import ThreadCount
from domaintune.utils.config_types import ConfigPath, StrictModel
from domaintune.utils.names import check_model_name


class ServedModelConfig(StrictModel):
    name: str = Field(..., description="Public model name clients put in `model`.")
    source: str = Field(
        ...,
        description=(
            "A LoRA adapter folder, a full model folder (e.g. export/merged), or a registry URI "
            "(`registry://name@production`, `registry://name@v1.2.0`)."
        ),
    )
    parent: str | None = Field(
        None,
        description="Served model an adapter applies to (default: the adapter's recorded base, normally the base).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_model_name(value)


class CanaryConfig(StrictModel):
    model: str = Field(..., description="Public model name the canary runs under.")
    stable: str = Field(..., description="Source of the stable version (folder or registry URI).")
    candidate: str = Field(..., description="Source of the candidate version (folder or registry URI).")
    candidate_share: float = Field(0.1, ge=0.0, le=1.0, description="Share of users/keys routed to the candidate.")
    margin: float = Field(
        0.05, ge=0.0, le=1.0, description="Roll back when the candidate is worse than stable by more than this."
    )
    window: int = Field(200, ge=1, description="Sliding window: last N requests per arm are compared.")
    min_requests: int = Field(30, ge=1, description="Requests needed in each arm's window before any decision.")
    promote_after: int = Field(
        200, ge=1, description="Candidate requests that must pass the comparison before it is promoted."
    )
    auto_promote: bool = Field(True, description="Promote automatically once `promote_after` requests passed.")
    salt: str = Field("canary", description="Salt of the sticky hash (change it to reshuffle who gets the candidate).")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_model_name(value)

    @model_validator(mode="after")
    def _check(self) -> CanaryConfig:
        if self.min_requests > self.window:
            raise ValueError(f"min_requests ({self.min_requests}) cannot exceed window ({self.window})")
        return self


class ServeConfig(StrictModel):
    host: str = Field("127.0.0.1", description="Address to bind (0.0.0.0 in a container).")
    port: int = Field(8000, ge=0, le=65535)
    engine: Literal["auto", "transformers", "vllm", "llamacpp"] = Field(
        "auto",
        description=(
            "Inference engine. `auto`: vLLM when it is installed and a CUDA GPU is present, else llama.cpp (q8_0 "
            "GGUF, continuous batching) when llama-cpp-python is installed, else transformers (the choice and its "
            "reason are logged at start). `vllm` / `llamacpp` fail when they cannot run."
        ),
    )
    base_name: str | None = Field(
        None,
        description="Public name of the base model (default: model.name_or_path, or its last part when it is a path).",
    )
    serve_base: bool = Field(True, description="List and serve the base model itself.")
    serve_trained: bool = Field(
        True,
        description="Also serve `<output_dir>/model` (the train stage's output) under the project name, when present.",
    )
    models: list[ServedModelConfig] = Field(default_factory=list, description="Extra adapters / versions to serve.")
    canary: CanaryConfig | None = Field(None, description="Canary rollout of a candidate version; off when absent.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = Field(
        None, description="Weights dtype for serving (default: model.dtype)."
    )
    num_threads: ThreadCount = Field(
        "auto",
        description="torch CPU threads of the transformers engine. auto (or null): one per physical core this "
        "process may use (affinity, SMT siblings and cgroup quota considered).",
    )
    max_batch_size: int = Field(16, ge=1, description="Most requests decoded together in one batch.")
    max_batch_tokens: int = Field(
        4096,
        ge=1,
        description="Padded prompt tokens per batch (size x longest prompt); similar lengths are batched together.",
    )
    batch_wait_ms: float = Field(10.0, ge=0, description="How long the batcher waits to fill a batch.")
    max_queue: int = Field(512, ge=1, description="Queued requests beyond this get 503.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unanswered after this gets 504.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="`max_tokens` when a request gives none.")
    default_temperature: float = Field(0.7, ge=0.0, le=2.0)
    default_top_p: float = Field(1.0, gt=0.0, le=1.0)
    default_repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        description=(
            "`repetition_penalty` when a request gives none (1.0 = none; transformers' rule over prompt and answer, "
            "as vLLM's). Set it to eval.decoding.repetition_penalty so the server decodes as the eval measured."
        ),
    )
    max_context_tokens: int | None = Field(
        None, ge=16, description="Context length to enforce (default: the model's max_position_embeddings)."
    )
    max_body_bytes: int = Field(
        1_000_000, ge=1024, description="Larger request bodies get 413 (counted as they arrive, chunked ones too)."
    )
    require_api_key: bool = Field(True, description="Require `Authorization: Bearer <key>` on /v1 endpoints.")
    store_url: str | None = Field(
        None,
        description=(
            "SQLAlchemy URL of the key/usage/request/feedback/canary store (default: sqlite in <output_dir>/serve/); "
            "several replicas share one, e.g. postgresql+psycopg://user:pass@db/domaintune."
        ),
    )
    limits_url: str | None = Field(
        None,
        description=(
            "Where rate-limit, token-quota and failed-auth counters live: unset keeps them in this process's "
            "memory (one replica); `redis://host:6379/0` shares them between replicas."
        ),
    )
    log_requests: bool = Field(True, description="Store every request/response (PII-redacted) for the feedback loop.")
    redact_pii: bool = Field(True, description="Redact PII (data stage's redactor) before anything is stored.")
    metrics_require_key: bool = Field(False, description="Require an admin key for /metrics.")
    key_hash_iterations: int = Field(100_000, ge=1000, description="PBKDF2-SHA256 iterations for API key hashes.")
    auth_failures_per_minute: int = Field(
        10,
        ge=1,
        description=(
            "Key checks that may fail per minute, per client address and per key id; beyond it such checks get 429 "
            "without being hashed (keys already verified on this replica keep working)."
        ),
    )
    max_pending_key_checks: int = Field(
        32, ge=1, description="Key hashes queued at once; beyond it new unverified keys get 429 at no cost."
    )
    feedback_per_minute: int = Field(30, ge=1, description="Feedback posts per minute per key (or client address).")
    max_feedback_per_request: int = Field(5, ge=1, description="Feedback rows one logged request may receive.")
    max_feedback_chars: int = Field(10_000, ge=1, description="Longest correction or comment accepted, in characters.")
    cpu_workers: int = Field(
        2, ge=1, description="Threads for request CPU work off the event loop (JSON parsing, chat template, tokens)."
    )
    vllm_gpu_memory_utilization: float = Field(0.85, gt=0.0, le=1.0)
    feedback_dir: ConfigPath | None = Field(
        None, description="Where `domaintune feedback export` writes (default: <output_dir>/feedback)."
    )

    @field_validator("base_name")
    @classmethod
    def _base_name(cls, value: str | None) -> str | None:
        return None if value is None else check_model_name(value)

    @field_validator("limits_url")
    @classmethod
    def _limits_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("use redis://host:port/db (or rediss://, unix://); leave it unset for in-memory limits")
        return value

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_cap ({self.max_tokens_cap})"
            )
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: duplicate names {dupes}")
        if self.canary and self.canary.model in names:
            raise ValueError(f"canary.model {self.canary.model!r} is also listed in models; use one or the other")
        return self
