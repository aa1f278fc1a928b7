"""Batched generation and scoring over llama.cpp: many sequences decoded together in one context.

`Decoder` keeps up to `n_seq` sequences in flight (continuous batching): every `step()` is one
`llama_decode` holding the next token of each running sequence plus as much of waiting prompts as the
batch has room for; a sequence whose prompt is complete gets its next token sampled from its own
logits (greedy, or temperature / top-p with its own seed, and transformers' repetition penalty; only among
the tokens its `guide`'s grammar allows, when it has one), and finishes at an end-of-turn token or at
`max_tokens`. A finished sequence's slot and KV cache are free for the next one at once. `generate()`
runs a list of prompts to completion (eval); the serving engine drives `Decoder` itself. `score_rows()` gives
each reference's negative log-likelihood (perplexity) and its most likely token at each answer position.

A sequence may carry a `reference` (eval's perplexity): its tokens are fed teacher-forced right after the
prompt, in the same prompt pass, and scored; then they are dropped from the KV cache and the answer is
generated from the prompt's last logits. The prompt is processed once for both, instead of once for the
answer and again by a separate scoring pass.
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
    reference: list[int] | None = None  # tokens scored teacher-forced after the prompt (None: nothing to score)
    nll: float = 0.0  # the reference's summed negative log-likelihood (complete once the prompt pass is)
    stream: list[int] = field(default_factory=list)  # what the prompt pass feeds: prompt, then reference[:-1]
    first_logits: np.ndarray | None = None  # the prompt's last logits (they also score reference[0])

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Still in its prompt pass (a sequence that has sampled a token has left it)."""
        return not self.tokens and self.fed < len(self.stream)

    def wants_logits(self, pos: int) -> bool:
        """Logits at `pos` of the prompt pass: the last prompt position, and every scored reference position."""
        last_prompt = len(self.prompt) - 1
        return pos == last_prompt or (self.reference is not None and pos > last_prompt)


@dataclass
class _Chunk:
    """A sequence's part of one batch's prompt pass: entries[start : start + length]."""

    seq: Seq
    start: int
    length: int
    last: bool  # the prompt pass ends in this batch


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
        self.refed_prompts = 0  # references whose KV could not be cut off (the prompt was fed again instead)
        self.max_scored_rows = 512  # reference positions with logits per batch: bounds llama.cpp's output buffer

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
            seq.stream = seq.prompt + seq.reference[:-1]
        else:
            seq.stream = seq.prompt
        seq.slot = self.free_slots.popleft()
        seq.fed = 0
        seq.nll, seq.first_logits = 0.0, None
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

    def _plan(self) -> tuple[list[Entry], list[Seq], list[_Chunk]]:
        """This step's batch: each decoding sequence's last token first, then prompt-pass chunks that fit.

        Returns the entries, the decoding sequences (one logits row each) and the prompt-pass chunks.
        """
        entries: list[Entry] = []
        decoding = [s for s in self.running if not s.prefilling]
        for s in decoding:
            entries.append(Entry(s.tokens[-1], s.fed, s.slot, True))
        chunks: list[_Chunk] = []
        room = self.ctx.n_batch - len(entries)
        scored_room = self.max_scored_rows
        for s in (s for s in self.running if s.prefilling):
            if room <= 0:
                break
            end = s.fed + room
            if s.reference is not None:  # every position from the prompt's last asks for logits: cap them
                first_scored = max(s.fed, len(s.prompt) - 1)
                end = min(end, first_scored + scored_room)
                scored_room -= max(0, min(end, len(s.stream)) - first_scored)
            chunk = s.stream[s.fed : end]
            if not chunk:
                continue
            last = s.fed + len(chunk) == len(s.stream)
            chunks.append(_Chunk(s, len(entries), len(chunk), last))
            entries.extend(
                Entry(t, s.fed + i, s.slot, s.wants_logits(s.fed + i) or (last and i == len(chunk) - 1))
                for i, t in enumerate(chunk)
            )
            room -= len(chunk)
        return entries, decoding, chunks

    def step(self) -> list[tuple[Seq, int]]:
        """One llama_decode; returns the (sequence, new token) pairs sampled, finished ones included."""
        entries, decoding, chunks = self._plan()
        if not entries:
            return []
        rows = self.ctx.decode(entries)
        self.decodes += 1
        out_index = {batch_row: k for k, batch_row in enumerate(rows)}
        ready: list[tuple[Seq, np.ndarray]] = [(s, self.ctx.logits(i)) for i, s in enumerate(decoding)]
        for c in chunks:  # every chunk's logits are read before a re-fed prompt could overwrite them
            c.seq.fed += c.length
            self._take_chunk_logits(c, entries, out_index)
        ready += [(c.seq, self._end_prompt_pass(c.seq)) for c in chunks if c.last]
        out: list[tuple[Seq, int]] = []
        for s, logits in ready:
            s.fed = len(s.prompt) + len(s.tokens)
            token = self._sample(s, logits)
            out.append((s, token))
            if token in self.stop_ids:
                self.finish(s, "stop")
                continue
            s.tokens.append(token)
            if len(s.tokens) >= s.params.max_tokens:
                self.finish(s, "length")
        return out

    def _take_chunk_logits(self, c: _Chunk, entries: list[Entry], out_index: dict[int, int]) -> None:
        """Keep the prompt's last logits; add the chunk's reference positions to the sequence's NLL."""
        s = c.seq
        wanted = [b for b in range(c.start, c.start + c.length) if entries[b].logits]
        if not wanted:
            return
        outputs = self.ctx.outputs()
        block = outputs[out_index[wanted[0]] : out_index[wanted[-1]] + 1]  # a chunk's rows are contiguous
        positions = [entries[b].pos for b in wanted]
        last_prompt = len(s.prompt) - 1
        if positions[0] <= last_prompt <= positions[-1]:
            s.first_logits = block[last_prompt - positions[0]].copy()
        if s.reference is not None:
            keep = [k for k, p in enumerate(positions) if p >= last_prompt]
            targets = [s.reference[positions[k] - last_prompt] for k in keep]
            s.nll += _sum_nll(block[keep[0] : keep[-1] + 1], targets) if keep else 0.0

    def _end_prompt_pass(self, s: Seq) -> np.ndarray:
        """The logits the first token is sampled from; a scored reference's KV entries are cut off first."""
        logits = s.first_logits
        if logits is None:
            raise RuntimeError("llama.cpp returned no logits for the prompt's last position")
        s.first_logits = None
        if len(s.stream) > len(s.prompt) and not self.ctx.trim(s.slot, len(s.prompt)):
            # A cache that cannot drop a tail (sliding-window or recurrent layers): feed the prompt again.
            self.ctx.clear(s.slot)
            self.refed_prompts += 1
            self._refeed(s)
        return logits

    def _refeed(self, s: Seq) -> None:
        """The prompt alone, fed again into a cleared slot (its logits are already known)."""
        for start in range(0, len(s.prompt), self.ctx.n_batch):
            part = s.prompt[start : start + self.ctx.n_batch]
            self.ctx.decode([Entry(t, start + i, s.slot, False) for i, t in enumerate(part)])

    def _sample(self, s: Seq, logits: np.ndarray) -> int:
        if s.guide is not None:  # only the tokens its grammar allows next
            logits = np.where(s.guide.allowed(logits.shape[0]), logits, -np.inf).astype(logits.dtype)
        token = sample_token(logits, s)
        if s.guide is not None:
            s.guide.advance(token)
        return token


def generate(
    decoder: Decoder,
    prompts: Sequence[list[int]],
    params: Sampling | Sequence[Sampling],
    on_done: Callable[[int, Seq], None] | None = None,
    references: Sequence[list[int] | None] | None = None,
) -> list[Seq]:
    """Every prompt decoded to its end, `n_seq` at a time; results in prompt order. With `references`, each
    sequence's `nll` is its reference's summed negative log-likelihood, scored in the same prompt pass."""
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
