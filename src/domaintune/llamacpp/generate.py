"""Batched generation and scoring over llama.cpp: many sequences decoded together in one context.

`Decoder` keeps up to `n_seq` sequences in flight (continuous batching): every `step()` is one
`llama_decode` holding the next token of each running sequence plus as much of waiting prompts as the
batch has room for; a sequence whose prompt is complete gets its next token sampled from its own
logits (greedy, or temperature / top-p with its own seed, and transformers' repetition penalty; only among
the tokens its `guide`'s grammar allows, when it has one), and finishes at an end-of-turn token or at
`max_tokens`. A finished sequence's slot and KV cache are free for the next one at once. `generate()`
runs a list of prompts to completion (eval); the serving engine drives `Decoder` itself. `score_rows()` gives
each reference's negative log-likelihood (perplexity) and its most likely token at each answer position.

A sequence may carry a `reference` (eval's perplexity), scored on the prompt the answer was generated from:
the prompt's last logits score the reference's first token; when the answer ends, the answer's tokens are cut
from the sequence's KV cache and the reference's are fed teacher-forced in a `llama_decode` of their own
(the references of every sequence that ended in that step together), before the slot is freed. The prompt is
processed once for answer and score, and the answers' batches are exactly those without references, so the
answers are the same tokens.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from domaintune.llamacpp.runtime import Context, Entry, GGUFModel


class Guide(Protocol):
    """A grammar followed token by token (the serving engine's `serve.engines.guided.Guide`)."""

    def allowed(self, vocab_size: int) -> np.ndarray:
        """Which of `vocab_size` tokens may come next (booleans)."""
        ...

    def advance(self, token: int) -> None:
        """Take the token sampled."""
        ...


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None


@dataclass
class Seq:
    """One sequence: its prompt, what it generated and why it stopped."""

    prompt: list[int]
    params: Sampling
    tag: object = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled
    slot: int = -1
    fed: int = 0  # tokens of prompt + generated already in the KV cache
    rng: np.random.Generator | None = None
    guide: Guide | None = None  # a grammar the tokens must follow (constrained decoding); None: free
    reference: list[int] | None = None  # tokens scored after the answer, on the same prompt (None: no score)
    nll: float = 0.0  # the reference's summed negative log-likelihood (complete when the sequence is done)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def sample_token(logits: np.ndarray, seq: Seq) -> int:
    """The next token: transformers' repetition penalty, then greedy or temperature / top-p sampling."""
    p = seq.params
    for token, bias in (p.logit_bias or {}).items():
        logits[token] += bias
    if p.repetition_penalty != 1.0:
        seen = np.fromiter(set(seq.prompt) | set(seq.tokens), dtype=np.int64)
        picked = logits[seen]
        logits[seen] = np.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
    if p.temperature <= 0.0:
        return int(np.argmax(logits))
    if seq.rng is None:
        seq.rng = np.random.default_rng(p.seed)
    scaled = logits.astype(np.float64) / p.temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < p.top_p
        keep[0] = True
        order, sorted_probs = order[keep], sorted_probs[keep]
        return int(order[seq.rng.choice(len(order), p=sorted_probs / sorted_probs.sum())])
    return int(seq.rng.choice(len(probs), p=probs))


class Decoder:
    """Continuous batching of up to `n_seq` sequences on one llama.cpp context."""

    def __init__(
        self,
        model: GGUFModel,
        stop_ids: Iterable[int] | None = None,
        n_seq: int = 16,
        seq_ctx: int = 2048,
        n_batch: int = 2048,
        threads: int | None = None,
        lora=None,
        flash_attention: bool | None = None,
    ):
        """`flash_attention`: None lets llama.cpp decide (on, on CPU). Which is faster for many sequences
        depends on the CPU (the main job's eval, 32 sequences: 2-core Sapphire Rapids Xeon with AMX 223 tok/s
        off, 161 on; 2-core AMD EPYC Zen 5 148-169 off, 196-204 on), so eval measures both once per machine
        (`tuning.choose_flash_attention`); serving, where prompts dominate, keeps llama.cpp's choice (64
        requests of <= 32 tokens on the Xeon: 18.3 s with it, 28.9 s without; docs/llamacpp.md)."""
        self.model = model
        self.ctx = Context(
            model,
            n_seq=n_seq,
            seq_ctx=seq_ctx,
            n_batch=n_batch,
            threads=threads,
            lora=lora,
            flash_attention=flash_attention,
        )
        self.stop_ids = set(stop_ids) if stop_ids is not None else set(model.eog_ids())
        self.free_slots = collections.deque(range(n_seq))
        self.running: list[Seq] = []
        self.decodes = 0
        self.scoring_decodes = 0  # llama_decode calls that fed references
        self.refed_prompts = 0  # references whose answer could not be cut from the cache (prompt fed again)
        self.max_scored_rows = 512  # reference positions per scoring call: bounds llama.cpp's output buffer

    def close(self) -> None:
        self.ctx.close()

    @property
    def has_room(self) -> bool:
        return bool(self.free_slots)

    def add(self, seq: Seq) -> None:
        """Start a sequence (needs a free slot); a prompt longer than the slot's context keeps its end."""
        limit = self.ctx.seq_ctx - seq.params.max_tokens
        if limit < 1:
            raise ValueError(f"max_tokens {seq.params.max_tokens} leaves no room in a {self.ctx.seq_ctx}-token context")
        if len(seq.prompt) > limit:
            seq.prompt = seq.prompt[-limit:]
        if not seq.prompt:
            raise ValueError("an empty prompt cannot be decoded")
        if seq.reference is not None:
            if not seq.reference:
                raise ValueError("an empty reference cannot be scored")
            if len(seq.prompt) + len(seq.reference) - 1 > self.ctx.seq_ctx:
                raise ValueError(
                    f"prompt ({len(seq.prompt)}) and reference ({len(seq.reference)}) tokens exceed the "
                    f"{self.ctx.seq_ctx}-token context of a sequence"
                )
            seq.nll = 0.0
        seq.slot = self.free_slots.popleft()
        seq.fed = 0
        self.running.append(seq)

    def finish(self, seq: Seq, reason: str) -> None:
        """End a sequence now (stop, length, cancelled) and free its slot."""
        if seq.done and seq.slot < 0:
            return
        seq.finish_reason = seq.finish_reason or reason
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot >= 0:
            self.ctx.clear(seq.slot)
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def _plan(self) -> tuple[list[Entry], list[Seq], list[tuple[Seq, int]]]:
        """This step's batch: each decoding sequence's last token first, then prompt chunks that fit.

        Also returns the sequences whose prompt is only partly in this batch, with the length of their chunk.
        """
        entries: list[Entry] = []
        ready: list[Seq] = []
        partial: list[tuple[Seq, int]] = []
        decoding = [s for s in self.running if s.fed >= len(s.prompt)]
        prefilling = [s for s in self.running if s.fed < len(s.prompt)]
        for s in decoding:
            entries.append(Entry(s.tokens[-1], s.fed, s.slot, True))
            ready.append(s)
        room = self.ctx.n_batch - len(entries)
        for s in prefilling:
            if room <= 0:
                break
            chunk = s.prompt[s.fed : s.fed + room]
            last = s.fed + len(chunk) == len(s.prompt)
            entries.extend(Entry(t, s.fed + i, s.slot, last and i == len(chunk) - 1) for i, t in enumerate(chunk))
            room -= len(chunk)
            if last:
                ready.append(s)
            else:
                partial.append((s, len(chunk)))
        return entries, ready, partial

    def step(self) -> list[tuple[Seq, int]]:
        """One llama_decode; returns the (sequence, new token) pairs sampled, finished ones included."""
        entries, ready, partial = self._plan()
        if not entries:
            return []
        rows = self.ctx.decode(entries)
        self.decodes += 1
        for s, fed in partial:  # the rest of a long prompt follows in the next step, at the next position
            s.fed += fed
        by_slot = {entries[r].seq: r for r in rows}
        out: list[tuple[Seq, int]] = []
        ended: list[tuple[Seq, str]] = []
        for s in ready:
            s.fed = len(s.prompt) + len(s.tokens)
            logits = self.ctx.logits(by_slot[s.slot])
            if s.reference is not None and not s.tokens:  # the prompt's last logits score the first token
                s.nll += _sum_nll(logits[None, :], s.reference[:1])
            if s.guide is not None:  # only the tokens its grammar allows next
                logits = np.where(s.guide.allowed(logits.shape[0]), logits, -np.inf).astype(logits.dtype)
            token = sample_token(logits, s)
            if s.guide is not None:
                s.guide.advance(token)
            out.append((s, token))
            if token in self.stop_ids:
                ended.append((s, "stop"))
                continue
            s.tokens.append(token)
            if len(s.tokens) >= s.params.max_tokens:
                ended.append((s, "length"))
        self._score_references([s for s, _ in ended if s.reference is not None and len(s.reference) > 1])
        for s, reason in ended:
            self.finish(s, reason)
        return out

    def _score_references(self, seqs: list[Seq]) -> None:
        """Each ended sequence's answer cut from its cache, its reference's other tokens fed and scored
        (in decode calls of their own, so that the answers' batches stay what they were)."""
        pending: collections.deque[tuple[Seq, list[int], int]] = collections.deque()  # (seq, reference, next)
        for s in seqs:
            if not self.ctx.trim(s.slot, len(s.prompt)):
                # A cache that cannot drop a tail (sliding-window or recurrent layers): feed the prompt again.
                self.ctx.clear(s.slot)
                self.refed_prompts += 1
                for start in range(0, len(s.prompt), self.ctx.n_batch):
                    part = s.prompt[start : start + self.ctx.n_batch]
                    self.ctx.decode([Entry(t, start + i, s.slot, False) for i, t in enumerate(part)])
            pending.append((s, s.reference or [], 0))
        while pending:
            entries: list[Entry] = []
            placed: list[tuple[Seq, list[int], int, int]] = []  # (seq, reference, first index fed, count)
            room = min(self.ctx.n_batch, self.max_scored_rows)
            while pending and room > 0:
                s, ref, k = pending.popleft()
                feed = ref[k : len(ref) - 1][:room]  # the last reference token is only ever a target
                entries.extend(Entry(t, len(s.prompt) + k + i, s.slot, True) for i, t in enumerate(feed))
                placed.append((s, ref, k, len(feed)))
                room -= len(feed)
                if k + len(feed) < len(ref) - 1:
                    pending.appendleft((s, ref, k + len(feed)))
            self.ctx.decode(entries)
            self.scoring_decodes += 1
            outputs, row = self.ctx.outputs(), 0
            for s, ref, k, n in placed:
                s.nll += _sum_nll(outputs[row : row + n], ref[k + 1 : k + 1 + n])
                row += n


def generate(
    decoder: Decoder,
    prompts: Sequence[list[int]],
    params: Sampling | Sequence[Sampling],
    on_done: Callable[[int, Seq], None] | None = None,
    references: Sequence[list[int] | None] | None = None,
) -> list[Seq]:
    """Every prompt decoded to its end, `n_seq` at a time; results in prompt order. With `references`, each
    sequence's `nll` is its reference's summed negative log-likelihood on that prompt."""
    per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
    refs = list(references) if references is not None else [None] * len(prompts)
    waiting = collections.deque(
        Seq(list(p), s, tag=i, reference=None if r is None else list(r))
        for i, (p, s, r) in enumerate(zip(prompts, per_prompt, refs, strict=True))
    )
    results: list[Seq | None] = [None] * len(prompts)
    while waiting or decoder.running:
        while waiting and decoder.has_room:
            decoder.add(waiting.popleft())
        for seq, _token in decoder.step():
            if seq.done:
                index = int(seq.tag)  # type: ignore[call-overload]
                results[index] = seq
                if on_done:
                    on_done(index, seq)
    return [r for r in results if r is not None]


def score_rows(ctx: Context, rows: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, int, list[int]]]:
    """(sum of negative log-likelihood, number of tokens, the most likely token at each of those positions) of
    each answer given its prompt: teacher-forced, so every position is compared on the same history.

    Sequences are packed into batches of up to `n_batch` tokens over the context's slots; logits are
    asked for only at the positions that predict answer tokens (a sequence longer than the batch keeps
    its end).
    """
    results: list[tuple[float, int, list[int]]] = [(0.0, 0, [])] * len(rows)
    pending = collections.deque(range(len(rows)))
    limit = min(ctx.seq_ctx, ctx.n_batch)
    while pending:
        entries: list[Entry] = []
        placed: list[tuple[int, list[int], int]] = []  # (row, tokens, first scored position)
        while pending and len(placed) < ctx.n_seq:
            prompt, answer = rows[pending[0]]
            seq = (prompt + answer)[-limit:]
            if entries and len(entries) + len(seq) > ctx.n_batch:
                break
            i = pending.popleft()
            first = len(seq) - min(len(answer), len(seq) - 1) - 1
            placed.append((i, seq, first))
            slot = len(placed) - 1
            entries.extend(Entry(t, p, slot, first <= p < len(seq) - 1) for p, t in enumerate(seq))
        ctx.decode(entries)
        outputs = ctx.outputs()  # one row per scored position, in batch order
        row = 0
        for i, seq, first in placed:
            n = len(seq) - 1 - first
            logits = outputs[row : row + n]
            results[i] = (_sum_nll(logits, seq[first + 1 :]), n, logits.argmax(axis=1).tolist())
            row += n
        ctx.clear()
    return results


def _sum_nll(logits: np.ndarray, targets: list[int]) -> float:
    """Sum over rows of -log softmax(row)[target] (log-sum-exp per row, in float64 after the max is taken)."""
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0].astype(np.float64) + np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64))
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    return float((lse - picked).sum())
