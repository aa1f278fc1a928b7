"""Inference engines behind one interface (`Engine`): transformers (default, CPU) and vLLM (CUDA GPU)."""

from __future__ import annotations

from domaintune.errors import UserError
from domaintune.serve.config import ServeConfig
from domaintune.serve.engines.base import (
    Backbone,
    Completion,
    Engine,
    GenRequest,
    QueueFullError,
    SamplingParams,
)
from domaintune.serve.engines.transformers import TransformersEngine
from domaintune.serve.engines.vllm import VLLMEngine, vllm_unavailable_reason

__all__ = [
    "Backbone",
    "Completion",
    "Engine",
    "GenRequest",
    "QueueFullError",
    "SamplingParams",
    "TransformersEngine",
    "VLLMEngine",
    "build_engine",
    "choose_engine",
    "vllm_unavailable_reason",
]


def choose_engine(setting: str) -> tuple[str, str]:
    """(engine name, reason) for the `serve.engine` setting; `vllm` that cannot run is an error."""
    reason = vllm_unavailable_reason()
    if setting == "vllm":
        if reason:
            raise UserError(f"serve.engine is 'vllm' but vLLM cannot run here: {reason}")
        return "vllm", "serve.engine=vllm"
    if setting == "transformers":
        return "transformers", "serve.engine=transformers"
    if reason is None:
        return "vllm", "serve.engine=auto: vllm is installed and a CUDA GPU is present"
    return "transformers", f"serve.engine=auto: using transformers because {reason}"


def build_engine(name: str, dtype: str, serve_cfg: ServeConfig) -> Engine:
    """The engine `choose_engine` named, configured from the `serve:` section."""
    if name == "vllm":
        return VLLMEngine(
            dtype="auto" if dtype == "float32" else dtype,
            gpu_memory_utilization=serve_cfg.vllm_gpu_memory_utilization,
            max_model_len=serve_cfg.max_context_tokens,
        )
    return TransformersEngine(
        dtype=dtype,
        max_batch_size=serve_cfg.max_batch_size,
        batch_wait_ms=serve_cfg.batch_wait_ms,
        max_queue=serve_cfg.max_queue,
        max_batch_tokens=serve_cfg.max_batch_tokens,
    )
