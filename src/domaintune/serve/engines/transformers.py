"""The transformers engine: batched generation with transformers + peft on CPU (or one GPU).

One background thread takes queued requests, batches the ones on the same backbone (left-padded,
one `generate` call, adapters mixed per row through peft's `adapter_names`), samples each row with
its own temperature/top_p/seed and repetition penalty (transformers' rule over its own prompt and
answer) within its grammar when it has one (`guided.Guide`: tool_choice required / a named function),
and stops each row on its own at the end-of-turn tokens, its stop strings or its `max_tokens`.

A request's failure stays its own: a row whose sampling or decoding fails gets the error and stops
while the other rows go on; when the batch fails as a whole, the rows that had not produced a
token yet run again one by one, so only the request that breaks the model gets the error.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from domaintune.errors import UserError
from domaintune.model.tools import TOOL_CALL_MARKERS
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

log = logging.getLogger("domaintune.serve")

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


def kept_markers(tokenizer) -> dict[int, str]:
    """The tool-call markers (Mistral's `[TOOL_CALLS]`, `[ARGS]`, `[CALL_ID]`) this tokenizer has as tokens, by id:
    the answer text keeps them although it skips special tokens, since the tool-call parser reads them (as vLLM
    decodes with special tokens for its Mistral parser)."""
    ids = {tokenizer.convert_tokens_to_ids(m): m for m in TOOL_CALL_MARKERS}
    return {i: m for i, m in ids.items() if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == m}


class IncrementalText:
    """Turns a growing list of token ids into text pieces, holding back what a stop string may still claim."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.markers = kept_markers(tokenizer)

    def _decode(self) -> str:
        if not self.markers or not any(i in self.markers for i in self.ids):
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)
        parts: list[str] = []
        run: list[int] = []
        for token_id in self.ids:
            if token_id in self.markers:
                parts += [self.tokenizer.decode(run, skip_special_tokens=True), self.markers[token_id]]
                run = []
            else:
                run.append(token_id)
        parts.append(self.tokenizer.decode(run, skip_special_tokens=True))
        return "".join(parts)

    def add(self, token_id: int) -> bool:
        """Add a token; True when a stop string now appears (the text is cut before it)."""
        self.ids.append(token_id)
        self.text = self._decode()
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return True
        return False

    def piece(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            end -= self.hold
            while end > self.sent and self.text[end - 1] == "\ufffd":  # half of a multi-byte character
                end -= 1
        if end <= self.sent:
            return ""
        out = self.text[self.sent : end]
        self.sent = end
        return out


class _Row:
    def __init__(self, request: GenRequest, tokenizer, eot_ids: set[int]):
        import torch

        self.request = request
        self.eot_ids = eot_ids
        self.text = IncrementalText(tokenizer, request.params.stop)
        self.done = False
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.guide: Guide | None = None
        if request.params.grammar is not None:  # tool_choice required / a named function: one call
            self.guide = Guide(request.params.grammar, tokenizer, sorted(eot_ids))
        seed = request.params.seed
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)

    def finish(self, reason: str) -> None:
        self.done = True
        self.finish_reason = reason
        if reason != "stop":  # cut off by max_tokens: drop half of a multi-byte character at the end
            self.text.text = self.text.text.rstrip("\ufffd")
        piece = self.text.piece(final=True)
        if piece:
            self.request.emit("delta", piece)
        self.request.emit(
            "done",
            Completion(
                text=self.text.text,
                completion_tokens=len(self.text.ids),
                finish_reason=reason,
                first_token_at=self.first_token_at,
            ),
        )

    def fail(self, exc: BaseException) -> None:
        """This row alone failed: its request gets the error, the batch goes on without it."""
        if self.done:
            return
        self.done = True
        self.finish_reason = "error"
        log.warning("generation failed for %s: %s", self.request.id, exc, extra={"event": "row_failed"})
        self.request.emit("error", exc)

    def step(self, token_id: int) -> None:
        if self.done:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.request.cancelled.is_set():
            self.finish("cancelled")
            return
        if token_id in self.eot_ids:
            self.finish("stop")
            return
        if self.text.add(token_id):
            self.finish("stop")
            return
        if len(self.text.ids) >= self.request.params.max_tokens:
            self.finish("length")
            return
        piece = self.text.piece(final=False)
        if piece:
            self.request.emit("delta", piece)


def _make_hooks(rows: list[_Row]):
    """A logits processor sampling each row on its own, and a per-row stopping criterion."""
    import torch
    from transformers import LogitsProcessor, StoppingCriteria

    class PerRowSampler(LogitsProcessor):
        # Sampling happens here, with each row's own generator, temperature and top_p; the chosen
        # token is left as the only finite score so that generate's greedy step picks exactly it.
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            for i, row in enumerate(rows):
                choice = 0
                if not row.done:
                    try:
                        choice = _sample(_guided(scores[i], row), row)
                        if row.guide is not None:
                            row.guide.advance(choice)
                    except Exception as exc:  # this row's failure, not the batch's
                        row.fail(exc)
                out[i, choice] = 0.0
            return out

    class PerRowStop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            last = input_ids[:, -1].tolist()
            for row, token_id in zip(rows, last):
                try:
                    row.step(int(token_id))
                except Exception as exc:  # e.g. decoding this row's text
                    row.fail(exc)
            return torch.tensor([row.done for row in rows], dtype=torch.bool, device=input_ids.device)

    return PerRowSampler(), PerRowStop()


def _guided(logits: Any, row: _Row) -> Any:
    """The row's logits with every token its grammar does not allow next at -inf (unchanged without a grammar)."""
    import torch

    if row.guide is None:
        return logits
    allowed = torch.from_numpy(row.guide.allowed(logits.shape[-1])).to(logits.device)
    return logits.masked_fill(~allowed, float("-inf"))


def _penalised(logits: Any, row: _Row) -> Any:
    """The row's logits after transformers' repetition penalty over its own prompt and the tokens it generated
    (not the batch's left padding): `generate(repetition_penalty=...)` on that prompt alone, step for step."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    penalty = row.request.params.repetition_penalty
    if penalty == 1.0:
        return logits
    seen = torch.tensor([row.request.prompt_ids + row.text.ids], dtype=torch.long, device=logits.device)
    return RepetitionPenaltyLogitsProcessor(penalty)(seen, logits[None])[0]


def _sample(logits: Any, row: _Row) -> int:
    """One token for one row: its repetition penalty, then greedy at temperature 0, else from its own generator
    within top_p."""
    import torch

    params = row.request.params
    logits = _penalised(logits, row)
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    if not bool(torch.isfinite(probs).all()):
        raise ValueError("the next-token distribution is not finite (logits overflowed)")
    return int(torch.multinomial(probs, 1, generator=row.generator))


def select_batch(
    pending: list[GenRequest], max_batch_size: int, max_batch_tokens: int, same_adapter: bool = False
) -> list[GenRequest]:
    """The oldest request plus the same-backbone requests closest to its prompt length that fit the budget.

    Prompts are left-padded to the longest one, so a batch costs (size x longest prompt) tokens of
    prefill and attention: mixing a 1,000-token prompt with 40-token ones wastes most of it. The
    oldest request is always taken, so nothing waits forever; one request over the budget runs alone.
    """
    first = pending[0]
    batch = [first]
    longest = len(first.prompt_ids)
    others = [
        r for r in pending[1:] if r.backbone == first.backbone and (not same_adapter or r.adapter == first.adapter)
    ]
    others.sort(key=lambda r: abs(len(r.prompt_ids) - len(first.prompt_ids)))  # stable: older first on ties
    for req in others:
        if len(batch) >= max_batch_size:
            break
        width = max(longest, len(req.prompt_ids))
        if (len(batch) + 1) * width > max_batch_tokens:
            continue
        batch.append(req)
        longest = width
    return batch


def _one_adapter_per_batch(model: Any) -> bool:
    """A PeftModel whose adapters cannot be mixed per row (peft's `adapter_names` takes plain LoRA only): a
    prefix / prompt / p-tuning adapter (never merged) or a DoRA one, so its batches run one adapter (or the
    base) at a time."""
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "is_prompt_learning", False) or getattr(c, "use_dora", False) for c in configs.values())


class TransformersEngine(Engine):
    """Batched generation with transformers + peft on CPU (or one GPU)."""

    name = "transformers"

    def __init__(
        self,
        dtype: str = "float32",
        max_batch_size: int = 16,
        batch_wait_ms: float = 10.0,
        max_queue: int = 512,
        max_batch_tokens: int = 4096,
    ):
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        self._backbones: dict[str, Backbone] = {}
        self._adapter_home: dict[str, str] = {}
        self._pending: collections.deque[GenRequest] = collections.deque()
        self._solo: collections.deque[GenRequest] = collections.deque()  # rows of a failed batch, run alone
        self._cond = threading.Condition()
        self._model_lock = threading.RLock()  # held while generating and while (un)loading weights
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.batches_run = 0

    # ---- weights --------------------------------------------------------------------------------
    def add_backbone(self, key: str, path: Path) -> Backbone:
        from domaintune.model.config import ModelConfig
        from domaintune.model.loader import end_of_turn_token_ids, load_model

        path = Path(path)
        tokenizer = load_tokenizer(path)
        model = load_model(ModelConfig(name_or_path=str(path)), model_dir=path, dtype=self.dtype)
        model.eval()
        backbone = Backbone(
            key=key,
            path=path,
            tokenizer=tokenizer,
            eot_ids=end_of_turn_token_ids(tokenizer),
            context_length=read_context_length(path),
            model=model,
            max_token_chars=max_token_chars(tokenizer),
        )
        with self._model_lock:
            self._backbones[key] = backbone
        return backbone

    def backbone(self, key: str) -> Backbone:
        return self._backbones[key]

    def add_adapter(self, name: str, path: Path, backbone: str) -> None:
        from peft import PeftModel

        with self._model_lock:
            bb = self._backbones[backbone]
            if name in self._adapter_home:
                raise UserError(f"adapter {name!r} is already loaded")
            if isinstance(bb.model, PeftModel):
                bb.model.load_adapter(str(path), adapter_name=name)
            else:
                bb.model = PeftModel.from_pretrained(bb.model, str(path), adapter_name=name)
            bb.model.eval()
            bb.adapters[name] = Path(path)
            self._adapter_home[name] = backbone

    def remove_adapter(self, name: str) -> None:
        with self._model_lock:
            backbone = self._adapter_home.pop(name, None)
            if backbone is None:
                raise UserError(f"adapter {name!r} is not loaded")
            bb = self._backbones[backbone]
            bb.adapters.pop(name)
            if bb.adapters:
                bb.model.delete_adapter(name)
            else:  # last adapter gone: unwrap to the plain base model
                bb.model = bb.model.unload()
                bb.model.eval()

    def remove_backbone(self, key: str) -> None:
        with self._model_lock:
            bb = self._backbones.pop(key)
            for name in list(bb.adapters):
                self._adapter_home.pop(name, None)

    # ---- queue ----------------------------------------------------------------------------------
    def submit(self, request: GenRequest) -> None:
        with self._cond:
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self._pending.append(request)
            self._cond.notify()

    def queue_depth(self) -> int:
        return len(self._pending) + len(self._solo)

    def problems(self) -> list[str]:
        if self._thread is None or not self._thread.is_alive():
            return ["the batching thread is not running"]
        return []

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="domaintune-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        with self._cond:  # whatever is still queued will never run: tell its waiters now
            for queue in (self._pending, self._solo):
                while queue:
                    queue.popleft().emit("error", RuntimeError("the server is shutting down"))

    def _take_batch(self) -> list[GenRequest] | None:
        with self._cond:
            while not self._pending and not self._solo and not self._stopping:
                self._cond.wait(timeout=0.5)
            if self._stopping:
                return None
            if self._solo:
                return [self._solo.popleft()]
            # Give concurrent clients a moment to join the batch.
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._pending) < self.max_batch_size and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(timeout=left)
            head = self._pending[0]
            unmixed = head.backbone in self._backbones and _one_adapter_per_batch(self._backbones[head.backbone].model)
            picked = select_batch(list(self._pending), self.max_batch_size, self.max_batch_tokens, unmixed)
            chosen = {id(r) for r in picked}
            self._pending = collections.deque(r for r in self._pending if id(r) not in chosen)
            return picked

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            live = [r for r in batch if not r.cancelled.is_set()]
            for r in batch:
                if r.cancelled.is_set():
                    r.emit("done", Completion("", 0, "cancelled", None))
            if not live:
                continue
            try:
                self._run_batch(live)
            except Exception as exc:  # nothing may kill the batcher: these requests get the error
                log.exception("generation failed for a batch of %d", len(live))
                for r in live:
                    r.emit("error", exc)

    def _still_loaded(self, batch: list[GenRequest]) -> tuple[Backbone | None, list[GenRequest]]:
        """The batch's backbone and the requests whose weights are still loaded; the others get an error."""
        for r in batch:
            if r.backbone not in self._backbones:
                r.emit("error", UserError(f"model weights {r.backbone!r} were unloaded"))
        batch = [r for r in batch if r.backbone in self._backbones]
        if not batch:
            return None, []
        bb = self._backbones[batch[0].backbone]
        for r in batch:
            if r.adapter is not None and r.adapter not in bb.adapters:
                r.emit("error", UserError(f"adapter {r.adapter!r} was unloaded"))
        return bb, [r for r in batch if r.adapter is None or r.adapter in bb.adapters]

    def _run_batch(self, batch: list[GenRequest]) -> None:
        import torch
        from peft import PeftModel
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        with self._model_lock:
            bb, batch = self._still_loaded(batch)
            if bb is None or not batch:
                return
            rows = _rows(batch, bb)
            if not rows:
                return
            batch = [row.request for row in rows]
            pad_id = bb.tokenizer.pad_token_id
            ids, mask = _left_padded([r.prompt_ids for r in batch], pad_id)
            sampler, stopper = _make_hooks(rows)
            gen_config = GenerationConfig(
                max_new_tokens=max(r.params.max_tokens for r in batch),
                do_sample=False,
                num_beams=1,
                eos_token_id=list(bb.eot_ids),
                pad_token_id=pad_id,
            )
            kwargs: dict[str, Any] = {}
            adapters_off: Any = contextlib.nullcontext()
            if _one_adapter_per_batch(bb.model):  # batches hold one adapter's rows (select_batch same_adapter)
                if batch[0].adapter is None:
                    adapters_off = bb.model.disable_adapter()
                else:
                    bb.model.set_adapter(batch[0].adapter)
            elif isinstance(bb.model, PeftModel):
                kwargs["adapter_names"] = [r.adapter or BASE_ADAPTER for r in batch]
            if self.on_batch:
                self.on_batch(len(batch))
            try:
                with torch.inference_mode(), adapters_off:
                    bb.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        generation_config=gen_config,
                        logits_processor=LogitsProcessorList([sampler]),
                        stopping_criteria=StoppingCriteriaList([stopper]),
                        **kwargs,
                    )
            except Exception as exc:
                self._recover(rows, exc)
                return
            finally:
                self.batches_run += 1
            for row in rows:  # generate ended (max_new_tokens reached) with rows still open
                if not row.done:
                    row.finish("length")

    def _recover(self, rows: list[_Row], exc: Exception) -> None:
        """The whole batch failed: rows that have not produced a token run again alone; the others get the error."""
        log.warning("a batch of %d failed (%s); retrying its requests one by one", len(rows), exc)
        with self._cond:
            for row in rows:
                if row.done:
                    continue
                if len(rows) > 1 and not row.text.ids and not row.request.solo:
                    row.done = True  # this attempt is over; the request itself goes on
                    row.request.solo = True
                    self._solo.append(row.request)
                else:
                    row.fail(exc)
            self._cond.notify()


def _rows(batch: list[GenRequest], bb: Backbone) -> list[_Row]:
    """A row per request; a request whose row cannot be set up (its grammar) gets the error alone."""
    rows = []
    for request in batch:
        try:
            rows.append(_Row(request, bb.tokenizer, set(bb.eot_ids)))
        except Exception as exc:
            request.emit("error", exc)
    return rows


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """(input ids, attention mask), left-padded so that every prompt ends at the last column."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        n = len(prompt)
        ids[i, width - n :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - n :] = 1
    return ids, mask
