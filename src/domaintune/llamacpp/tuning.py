"""Settings of llama.cpp that depend on the CPU, chosen by measuring them on the CPU in front of us.

Flash attention: llama.cpp's CPU kernel walks each (sequence, head) row by row. Whether that beats the plain
path for many sequences decoding together depends on the CPU: on a 2-core Sapphire Rapids Xeon with AMX the
main job's eval decoded 223 tok/s without it and 161 with it; on a 2-core AMD EPYC (Zen 5, no AMX) 148-169
without and 196-204 with it (docs/llamacpp.md). So a batch workload (eval) measures both once: the prompt
pass and a few decoding steps of `n_seq` sequences of its prompt length, on random tokens, each way; the
estimate `prompt pass + new_tokens x step` picks. The verdict is cached per CPU, llama.cpp build, model file
shape and workload shape in ~/.cache/domaintune/llamacpp-tuning.json, so it is paid once (seconds).

    DOMAINTUNE_LLAMACPP_FLASH_ATTENTION=1|0   # skip the measurement: on / off
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from domaintune.llamacpp.probe import library_key, read_state, state_file, write_state
from domaintune.llamacpp.runtime import Context, Entry, GGUFModel

log = logging.getLogger("domaintune.llamacpp")

ENV = "DOMAINTUNE_LLAMACPP_FLASH_ATTENTION"
_LOCK = threading.Lock()


@dataclass(frozen=True)
class FlashAttentionChoice:
    on: bool
    reason: str
    seconds_off: float | None = None  # the estimated workload, each way (None: not measured)
    seconds_on: float | None = None


def cache_file() -> Path:
    return state_file("llamacpp-tuning.json")


def _cpu_identity() -> str:
    """CPU model and flags: a home folder shared by different machines must not share verdicts."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown-cpu"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("flags")), "")
    return f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}|{os.cpu_count()}"


def _bucket(tokens: int) -> int:
    """Prompt lengths to the next power of two (64 at least), so similar workloads share a verdict."""
    return max(64, 1 << max(0, int(tokens) - 1).bit_length())


def workload_key(model: GGUFModel, n_seq: int, prompt_tokens: int, new_tokens: int, threads: int | None) -> str:
    shape = f"{model.path.stat().st_size}|{model.n_vocab}|{model.file_type()}|extra={model.extra_buffers}"
    return "|".join(
        [
            _cpu_identity(),
            str(library_key()),
            shape,
            f"seq={n_seq}|prompt={_bucket(prompt_tokens)}|new={new_tokens}|threads={threads}",
        ]
    )


def choose_flash_attention(
    model: GGUFModel, n_seq: int, prompt_tokens: int, new_tokens: int, threads: int | None = None
) -> FlashAttentionChoice:
    """Flash attention on or off for `n_seq` sequences of about `prompt_tokens` decoding `new_tokens` each."""
    env = os.environ.get(ENV)
    if env in ("0", "1"):
        return FlashAttentionChoice(env == "1", f"{ENV}={env}")
    key = workload_key(model, n_seq, prompt_tokens, new_tokens, threads)
    with _LOCK:
        cached = read_state(cache_file()).get(key)
        if cached is not None:
            try:
                return FlashAttentionChoice(**cached)
            except TypeError:
                pass  # written by another version: measured again
        choice = measure_flash_attention(model, n_seq, _bucket(prompt_tokens), new_tokens, threads)
        write_state(cache_file(), key, asdict(choice))
        return choice


def measure_flash_attention(
    model: GGUFModel, n_seq: int, prompt_tokens: int, new_tokens: int, threads: int | None = None, steps: int = 6
) -> FlashAttentionChoice:
    """Time each setting on the workload's shape (random tokens; off first, then on)."""
    estimate: dict[bool, float] = {}
    detail: dict[bool, str] = {}
    for on in (False, True):
        prompt_s, step_s = _time_workload(model, n_seq, prompt_tokens, steps, threads, on)
        estimate[on] = prompt_s + new_tokens * step_s
        detail[on] = f"prompts {prompt_s:.3g} s + {new_tokens} x {1000 * step_s:.3g} ms"
    on = estimate[True] < estimate[False]
    reason = (
        f"measured here for {n_seq} sequence(s) of {prompt_tokens} prompt tokens: off {detail[False]} = "
        f"{estimate[False]:.3g} s, on {detail[True]} = {estimate[True]:.3g} s"
    )
    log.info("llama.cpp flash attention %s: %s", "on" if on else "off", reason)
    return FlashAttentionChoice(on, reason, round(estimate[False], 3), round(estimate[True], 3))


def _time_workload(
    model: GGUFModel, n_seq: int, prompt_tokens: int, steps: int, threads: int | None, on: bool
) -> tuple[float, float]:
    """(seconds for every sequence's prompt, seconds per decoding step of all of them)."""
    rng = np.random.default_rng(0)
    ctx = Context(model, n_seq=n_seq, seq_ctx=prompt_tokens + steps + 8, threads=threads, flash_attention=on)
    try:
        prompts = rng.integers(0, model.n_vocab, size=(n_seq, prompt_tokens)).tolist()
        t0 = time.perf_counter()
        pending = [Entry(t, p, s, p == prompt_tokens - 1) for s in range(n_seq) for p, t in enumerate(prompts[s])]
        for start in range(0, len(pending), ctx.n_batch):
            ctx.decode(pending[start : start + ctx.n_batch])
        prompt_s = time.perf_counter() - t0
        ctx.decode([Entry(int(rng.integers(model.n_vocab)), prompt_tokens, s, True) for s in range(n_seq)])  # warm
        t0 = time.perf_counter()
        for k in range(1, steps + 1):
            ctx.decode([Entry(int(rng.integers(model.n_vocab)), prompt_tokens + k, s, True) for s in range(n_seq)])
        return prompt_s, (time.perf_counter() - t0) / steps
    finally:
        ctx.close()
