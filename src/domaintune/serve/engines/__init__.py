"""Inference engines behind one interface (`Engine`): vLLM (CUDA GPU), llama.cpp (CPU) and transformers."""

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
    from domaintune.serve.engines.llamacpp import llamacpp_unavailable_reason

    cpp_reason = llamacpp_unavailable_reason()
    if setting == "llamacpp":
        if cpp_reason:
            raise UserError(f"serve.engine is 'llamacpp' but llama.cpp cannot run here: {cpp_reason}")
        return "llamacpp", "serve.engine=llamacpp"
    if reason is None:
        return "vllm", "serve.engine=auto: vllm is installed and a CUDA GPU is present"
    if cpp_reason is None:
        return "llamacpp", f"serve.engine=auto: llama.cpp on the CPU because {reason}"
    return "transformers", f"serve.engine=auto: using transformers because {reason}, and {cpp_reason}"


def build_engine(name: str, dtype: str, serve_cfg: ServeConfig) -> Engine:
    """The engine `choose_engine` named, configured from the `serve:` section."""
    if name == "llamacpp":
        from domaintune.serve.engines.llamacpp import LlamaCppEngine

        return LlamaCppEngine(
            max_batch_size=serve_cfg.max_batch_size,
            max_queue=serve_cfg.max_queue,
            max_context=serve_cfg.max_context_tokens or 2048,
        )
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
