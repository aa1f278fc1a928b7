"""The vLLM engine (CUDA GPU): continuous batching, LoRA adapters through LoRARequest; a request's grammar
(tool_choice required / a named function) goes to vLLM's structured outputs on its `guidance` (llguidance)
backend, so it is the same grammar the transformers and llama.cpp engines enforce."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.serve.engines.base import (
    Backbone,
    Completion,
    Engine,
    GenRequest,
    load_tokenizer,
    max_token_chars,
    read_context_length,
)


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here, or None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install vllm, on a machine with a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


class VLLMEngine(Engine):
    """vLLM's async engine (CUDA GPU): continuous batching, LoRA adapters through LoRARequest.

    Same interface as TransformersEngine; construction fails with a clear UserError when vLLM
    cannot run (not installed, or no CUDA GPU).
    """

    name = "vllm"

    def __init__(
        self,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        max_model_len: int | None = None,
    ):
        reason = vllm_unavailable_reason()
        if reason:
            raise UserError(f"vLLM engine unavailable: {reason}")
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self._backbones: dict[str, Backbone] = {}
        self._engines: dict[str, Any] = {}
        self._adapter_home: dict[str, str] = {}
        self._lora_ids: dict[str, int] = {}
        self._in_flight = 0

    def start(self) -> None:
        """Nothing to start: each backbone's AsyncLLMEngine runs from the moment it is loaded."""

    def stop(self) -> None:
        """Nothing to stop here: the engines go with the process."""

    def add_backbone(self, key: str, path: Path) -> Backbone:
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.config import StructuredOutputsConfig

        from domaintune.model.loader import end_of_turn_token_ids

        path = Path(path)
        tokenizer = load_tokenizer(path)
        args = AsyncEngineArgs(
            model=str(path),
            dtype=self.dtype,
            enable_lora=True,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            gpu_memory_utilization=self.gpu_memory_utilization / max(1, len(self._engines) + 1),
            max_model_len=self.max_model_len,
            # tool_choice required / a named function send llguidance's Lark grammar (`guided.CallGrammar`)
            structured_outputs_config=StructuredOutputsConfig(backend="guidance"),
        )
        self._engines[key] = AsyncLLMEngine.from_engine_args(args)
        backbone = Backbone(
            key=key,
            path=path,
            tokenizer=tokenizer,
            eot_ids=end_of_turn_token_ids(tokenizer),
            context_length=self.max_model_len or read_context_length(path),
            max_token_chars=max_token_chars(tokenizer),
        )
        self._backbones[key] = backbone
        return backbone

    def backbone(self, key: str) -> Backbone:
        return self._backbones[key]

    def add_adapter(self, name: str, path: Path, backbone: str) -> None:
        if name in self._adapter_home:
            raise UserError(f"adapter {name!r} is already loaded")
        self._backbones[backbone].adapters[name] = Path(path)
        self._adapter_home[name] = backbone
        self._lora_ids[name] = max(self._lora_ids.values(), default=0) + 1

    def remove_adapter(self, name: str) -> None:
        backbone = self._adapter_home.pop(name, None)
        if backbone is None:
            raise UserError(f"adapter {name!r} is not loaded")
        self._backbones[backbone].adapters.pop(name)
        # No new request names it any more; vLLM's LoRA cache (max_loras slots, LRU) evicts its weights.
        self._lora_ids.pop(name)

    def remove_backbone(self, key: str) -> None:
        engine = self._engines.pop(key)
        self._backbones.pop(key)
        shutdown = getattr(engine, "shutdown", None)
        if shutdown:
            shutdown()

    def queue_depth(self) -> int:
        return self._in_flight

    def submit(self, request: GenRequest) -> None:
        request.loop.create_task(self._generate(request))

    async def _generate(self, request: GenRequest) -> None:
        """One request's generation; whatever goes wrong (its parameters too) is this request's error alone."""
        self._in_flight += 1
        try:
            await self._run(request)
        except Exception as exc:
            request.emit("error", exc)
        finally:
            self._in_flight -= 1

    def _sampling(self, request: GenRequest) -> Any:
        from vllm import SamplingParams as VSamplingParams

        p = request.params
        guided: dict[str, Any] = {}
        if p.grammar is not None:  # one tool call: the same llguidance grammar the other engines enforce
            from vllm.sampling_params import StructuredOutputsParams

            guided["structured_outputs"] = StructuredOutputsParams(grammar=p.grammar.lark)
        return VSamplingParams(
            **guided,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            stop=p.stop or None,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            stop_token_ids=list(self._backbones[request.backbone].eot_ids),
        )

    async def _run(self, request: GenRequest) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        bb = self._backbones[request.backbone]
        engine = self._engines[request.backbone]
        sampling = self._sampling(request)
        lora = None
        if request.adapter:
            lora = LoRARequest(request.adapter, self._lora_ids[request.adapter], str(bb.adapters[request.adapter]))
        sent = 0
        first_at = None
        final = None
        async for output in engine.generate(
            TokensPrompt(prompt_token_ids=request.prompt_ids), sampling, request.id, lora_request=lora
        ):
            out = output.outputs[0]
            if request.cancelled.is_set():
                await engine.abort(request.id)
                request.emit("done", Completion(out.text, len(out.token_ids), "cancelled", first_at))
                return
            if first_at is None and out.token_ids:
                first_at = time.monotonic()
            if len(out.text) > sent:
                request.emit("delta", out.text[sent:])
                sent = len(out.text)
            final = out
        reason = "length" if final is not None and final.finish_reason == "length" else "stop"
        request.emit(
            "done",
            Completion(final.text if final else "", len(final.token_ids) if final else 0, reason, first_at),
        )
