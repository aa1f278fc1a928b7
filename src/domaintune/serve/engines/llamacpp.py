"""The llama.cpp engine (CPU): GGUF weights, continuous batching of concurrent requests.

Each backbone is converted once to a GGUF (llama.cpp's converter, then its quantiser: `quant`, q8_0 by
default) and each adapter is merged into its backbone and converted likewise, so a tuned model decodes
as fast as its base. One thread drives a `Decoder` per loaded model: requests join a running batch at
any step (no waiting for the batch to drain), every step is one `llama_decode` over the next token of
every running request plus waiting prompts, and each request samples with its own temperature, top_p,
seed and repetition penalty (transformers' rule over its prompt and answer), within its grammar when it
has one (`guided.Guide`: tool_choice required / a named function), and stops on its own at the
end-of-turn tokens, its stop strings or its `max_tokens`, exactly as in the transformers engine (the
same `IncrementalText` holds back text a stop string may claim).

A request's failure stays its own: one that cannot start or whose text fails gets the error alone; when
a decoding step fails as a whole, the requests that had not produced a token yet run again one at a
time (a `solo` request waits for an empty batch and keeps others out), so only the culprit fails.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.serve.engines.base import (
    Backbone,
    Completion,
    Engine,
    GenRequest,
    QueueFullError,
    load_tokenizer,
    max_token_chars,
    read_context_length,
)
from domaintune.serve.engines.guided import Guide
from domaintune.serve.engines.transformers import IncrementalText

log = logging.getLogger("domaintune.serve")


def llamacpp_unavailable_reason() -> str | None:
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason

    return unavailable_reason() or converter_unavailable_reason()


class _Live:
    """A request being decoded: its text so far and the sequence in the decoder."""

    def __init__(self, request: GenRequest, tokenizer, seq):
        self.request = request
        self.text = IncrementalText(tokenizer, request.params.stop)
        self.seq = seq
        self.first_token_at: float | None = None

    def finish(self, reason: str) -> None:
        if reason != "stop":
            self.text.text = self.text.text.rstrip("\ufffd")
        piece = self.text.piece(final=True)
        if piece:
            self.request.emit("delta", piece)
        self.request.emit("done", Completion(self.text.text, len(self.text.ids), reason, self.first_token_at))

    def token(self, token_id: int) -> str | None:
        """Take a sampled token; returns a finish reason when the request is over."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.seq.finish_reason == "stop":  # the decoder stopped on an end-of-turn token
            return "stop"
        if self.text.add(token_id):
            return "stop"
        if self.seq.finish_reason == "length":
            return "length"
        piece = self.text.piece(final=False)
        if piece:
            self.request.emit("delta", piece)
        return None


class LlamaCppEngine(Engine):
    """Continuous batching over llama.cpp on CPU; one GGUF per backbone and per adapter."""

    name = "llamacpp"

    def __init__(self, quant: str = "q8_0", max_batch_size: int = 16, max_queue: int = 512, max_context: int = 2048):
        reason = llamacpp_unavailable_reason()
        if reason:
            raise UserError(f"llama.cpp engine unavailable: {reason}")
        self.quant = quant
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_context = max_context
        self._backbones: dict[str, Backbone] = {}
        self._decoders: dict[tuple[str, str | None], Any] = {}
        self._adapter_home: dict[str, str] = {}
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._live: dict[int, _Live] = {}
        self._cond = threading.Condition()
        self._lock = threading.RLock()  # held while decoding and while (un)loading weights
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps_run = 0

    @property
    def batches_run(self) -> int:
        """Decoding steps run (each one llama_decode over every running request): the transformers
        engine's `batches_run`, for metrics and tests."""
        return self.steps_run

    # ---- weights --------------------------------------------------------------------------------
    def _decoder(self, hf_dir: Path, eot_ids: list[int], context: int):
        from domaintune.llamacpp.cache import gguf_for
        from domaintune.llamacpp.generate import Decoder
        from domaintune.llamacpp.runtime import GGUFModel

        model = GGUFModel(gguf_for(hf_dir, self.quant))
        return Decoder(model, stop_ids=eot_ids, n_seq=self.max_batch_size, seq_ctx=context)

    def add_backbone(self, key: str, path: Path) -> Backbone:
        from domaintune.model.loader import end_of_turn_token_ids

        path = Path(path)
        tokenizer = load_tokenizer(path)
        eot = end_of_turn_token_ids(tokenizer)
        context = min(self.max_context, read_context_length(path))
        decoder = self._decoder(path, eot, context)
        backbone = Backbone(
            key=key,
            path=path,
            tokenizer=tokenizer,
            eot_ids=eot,
            context_length=context,
            max_token_chars=max_token_chars(tokenizer),
        )
        with self._lock:
            self._backbones[key] = backbone
            self._decoders[(key, None)] = decoder
        return backbone

    def backbone(self, key: str) -> Backbone:
        return self._backbones[key]

    def add_adapter(self, name: str, path: Path, backbone: str) -> None:
        from domaintune.llamacpp.cache import merged_adapter

        if name in self._adapter_home:
            raise UserError(f"adapter {name!r} is already loaded")
        bb = self._backbones[backbone]
        decoder = self._decoder(merged_adapter(Path(path), bb.path), bb.eot_ids, bb.context_length)
        with self._lock:
            bb.adapters[name] = Path(path)
            self._adapter_home[name] = backbone
            self._decoders[(backbone, name)] = decoder

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            backbone = self._adapter_home.pop(name, None)
            if backbone is None:
                raise UserError(f"adapter {name!r} is not loaded")
            self._backbones[backbone].adapters.pop(name)
            self._drop_decoder((backbone, name))

    def remove_backbone(self, key: str) -> None:
        with self._lock:
            bb = self._backbones.pop(key)
            for name in list(bb.adapters):
                self._adapter_home.pop(name, None)
                self._drop_decoder((key, name))
            self._drop_decoder((key, None))

    def _drop_decoder(self, key: tuple[str, str | None]) -> None:
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            return
        for seq in list(decoder.running):
            live = self._live.pop(id(seq), None)
            if live:
                live.request.emit("error", UserError("the model weights were unloaded"))
        decoder.close()

    # ---- queue ----------------------------------------------------------------------------------
    def submit(self, request: GenRequest) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self._pending.append(request)
            self._cond.notify()

    def queue_depth(self) -> int:
        return len(self._pending) + len(self._live)

    def problems(self) -> list[str]:
        if self._thread is None or not self._thread.is_alive():
            return ["the decoding thread is not running"]
        return []

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="domaintune-llamacpp", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._cond:
            while self._pending:
                self._pending.popleft().emit("error", RuntimeError("the server is shutting down"))
        for live in list(self._live.values()):
            live.request.emit("error", RuntimeError("the server is shutting down"))
        self._live.clear()

    # ---- decoding -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._live and not self._stopping:
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
            try:
                with self._lock:
                    self._admit()
                    self._step_all()
            except Exception as exc:  # one failing step must not kill the server: its requests get the error
                log.exception("llama.cpp decoding failed")
                for live in list(self._live.values()):
                    live.request.emit("error", exc)
                self._live.clear()
                for decoder in self._decoders.values():
                    for seq in list(decoder.running):
                        decoder.finish(seq, "cancelled")

    def _admit(self) -> None:
        """Move waiting requests into their model's running batch while it has free slots."""
        from domaintune.llamacpp.generate import Sampling, Seq

        with self._cond:
            waiting = list(self._pending)
            self._pending.clear()
        kept: list[GenRequest] = []
        solo_waiting = {(r.backbone, r.adapter) for r in waiting if r.solo}
        for request in waiting:
            decoder = self._decoders.get((request.backbone, request.adapter))
            if decoder is None:
                request.emit(
                    "error", UserError(f"model weights {request.backbone!r}/{request.adapter!r} are not loaded")
                )
                continue
            if request.cancelled.is_set():
                request.emit("done", Completion("", 0, "cancelled", None))
                continue
            key = (request.backbone, request.adapter)
            wait_for_solo = not request.solo and key in solo_waiting  # a retried request drains the batch first
            if (
                not decoder.has_room
                or (request.solo and decoder.running)
                or wait_for_solo
                or self._solo_running(decoder)
            ):
                kept.append(request)
                continue
            p = request.params
            try:
                sampling = Sampling(
                    p.max_tokens, p.temperature, p.top_p, repetition_penalty=p.repetition_penalty, seed=p.seed
                )
                seq = Seq(list(request.prompt_ids), sampling)  # the penalty covers these prompt ids too
                if p.grammar is not None:  # tool_choice required / a named function: one call
                    bb = self._backbones[request.backbone]
                    seq.guide = Guide(p.grammar, bb.tokenizer, sorted(bb.eot_ids))
                decoder.add(seq)
            except Exception as exc:  # this request cannot start: its error alone
                request.emit("error", exc)
                continue
            self._live[id(seq)] = _Live(request, self._backbones[request.backbone].tokenizer, seq)
        if kept:
            with self._cond:
                self._pending.extendleft(reversed(kept))

    def _step_all(self) -> None:
        for decoder in list(self._decoders.values()):
            for seq in list(decoder.running):
                live = self._live.get(id(seq))
                if live is not None and live.request.cancelled.is_set():
                    decoder.finish(seq, "cancelled")
                    self._live.pop(id(seq))
                    live.finish("cancelled")
            if not decoder.running:
                continue
            if self.on_batch:
                self.on_batch(len(decoder.running))
            try:
                stepped = decoder.step()
            except Exception as exc:
                self._recover(decoder, exc)
                continue
            for seq, token in stepped:
                live = self._live.get(id(seq))
                if live is None:
                    continue
                try:
                    reason = live.token(token)
                except Exception as exc:  # e.g. decoding this request's text: its error alone
                    decoder.finish(seq, "cancelled")
                    self._live.pop(id(seq))
                    live.request.emit("error", exc)
                    continue
                if reason is not None:
                    decoder.finish(seq, reason)
                    self._live.pop(id(seq))
                    live.finish(reason)
            self.steps_run += 1

    def _solo_running(self, decoder: Any) -> bool:
        return any(self._live[id(s)].request.solo for s in decoder.running if id(s) in self._live)

    def _recover(self, decoder: Any, exc: Exception) -> None:
        """A step failed as a whole: requests that produced no token yet run again alone, the others get the error."""
        running = list(decoder.running)
        log.warning("a llama.cpp step over %d requests failed (%s); retrying them one by one", len(running), exc)
        for seq in running:
            decoder.finish(seq, "cancelled")
            live = self._live.pop(id(seq), None)
            if live is None:
                continue
            if len(running) > 1 and not live.text.ids and not live.request.solo:
                live.request.solo = True
                with self._cond:
                    self._pending.appendleft(live.request)
            else:
                live.request.emit("error", exc)
