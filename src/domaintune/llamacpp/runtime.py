"""A thin, typed layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

`GGUFModel` is one loaded GGUF (weights, vocabulary, metadata, chat template); `Context` is one
inference context on it with `n_seq` independent sequences sharing a KV cache, fed by `decode()`
with tokens of any of them in one llama.cpp batch. Nothing here samples or schedules: see
`generate.py`. llama.cpp's own log goes to Python logging at debug level.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from domaintune.errors import UserError

log = logging.getLogger("domaintune.llamacpp")

_INIT_LOCK = threading.Lock()
_INITIALISED = False
_LOG_CALLBACK: Any = None  # kept alive: llama.cpp holds the pointer


def _lib():
    # llama.cpp's OpenMP threads wait for each other between the graph's nodes, hundreds of times a token.
    # Sleeping at once (OMP_WAIT_POLICY=PASSIVE) made one-sequence decoding 4.7x slower on a quiet 2-core
    # Xeon (33 vs 152 tok/s) and 16 sequences slower on a busy one too (133 vs 216 tok/s). A short spin
    # (30,000 rounds; libgomp's default is 300,000) bridges the gaps between nodes and sleeps soon after,
    # so an idle decoder gives its cores back (docs/llamacpp.md). Read when libgomp loads.
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    import llama_cpp

    return llama_cpp


def cpu_has_amx() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " amx_int8" in flags or " amx_tile" in flags


def use_extra_buffers(path: str | Path) -> bool:
    """Whether llama.cpp may repack the weights of the GGUF at `path` into its CPU "extra" buffer types.

    On AMX CPUs one of those is llama.cpp's AMX matmul (int8 tiles: 1.7x the decoding speed of 64
    sequences measured on a Sapphire Rapids Xeon), used where `amx_matmul_works()` saw this build run AMX
    batches in a child process, PyTorch's AMX matmul between them (llama-cpp-python 0.3.36 needs both of
    scripts/patches/ for that; setup.sh's build has them). Elsewhere the extra buffers hold repacked
    weights for AVX-512/AVX2 and are always safe. $DOMAINTUNE_LLAMACPP_EXTRA_BUFFERS: 1 on, 0 off.
    """
    env = os.environ.get("DOMAINTUNE_LLAMACPP_EXTRA_BUFFERS")
    if env in ("0", "1"):
        return env == "1"
    return not cpu_has_amx() or amx_matmul_works(path)


def amx_matmul_works(path: str | Path) -> bool:
    """Whether llama.cpp's AMX matmul runs with this build: a child process loads the GGUF at `path`
    with the AMX buffers and decodes one batch (a crash kills only the child). The verdict is kept per
    library build once a probe has used AMX; a model without AMX-shaped weights is probed each time."""
    from domaintune.llamacpp.probe import probe_amx

    return probe_amx(Path(path))


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its log to Python logging."""
    global _INITIALISED, _LOG_CALLBACK
    with _INIT_LOCK:
        if _INITIALISED:
            return
        L = _lib()
        L.llama_backend_init()

        @L.llama_log_callback
        def _to_logging(level, text, _user):  # pragma: no cover - called from C
            if text and log.isEnabledFor(logging.DEBUG):
                log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _LOG_CALLBACK = _to_logging
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        _INITIALISED = True


def default_threads() -> int:
    """Physical cores this process may use (llama.cpp is slower with hyper-threads on CPU)."""
    env = os.environ.get("DOMAINTUNE_LLAMACPP_THREADS")
    if env:
        return max(1, int(env))
    from domaintune.hardware.autoselect import usable_physical_cores

    return max(1, usable_physical_cores()[0])


class GGUFModel:
    """One GGUF file loaded by llama.cpp (CPU): weights, vocabulary, metadata and chat template."""

    def __init__(self, path: str | Path, vocab_only: bool = False, extra_buffers: bool | None = None):
        """`extra_buffers`: None decides by `use_extra_buffers`; False keeps llama.cpp's reference CPU kernels."""
        init_backend()
        L = _lib()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"GGUF file {self.path} does not exist")
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        params.vocab_only = vocab_only
        if vocab_only:
            extra_buffers = False
        params.use_extra_bufts = use_extra_buffers(self.path) if extra_buffers is None else extra_buffers
        self.extra_buffers = bool(params.use_extra_bufts)
        ptr = L.llama_model_load_from_file(str(self.path).encode(), params)
        if not ptr:
            raise UserError(f"llama.cpp could not load {self.path} (not a GGUF it supports?)")
        self.ptr = ptr
        self.vocab = L.llama_model_get_vocab(ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(ptr))
        self._lock = threading.Lock()

    def close(self) -> None:
        if getattr(self, "ptr", None):
            _lib().llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self):  # pragma: no cover - best effort at interpreter shutdown
        with contextlib.suppress(Exception):
            self.close()

    # -- metadata ---------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = _lib().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _lib().llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        raw = _lib().llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    def file_type(self) -> int:
        return int(_lib().llama_model_ftype(self.ptr))

    # -- vocabulary -------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        L = _lib()
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = _lib().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _lib().llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        return _lib().llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """Whether llama.cpp ends generation at this token (its end-of-generation set)."""
        return bool(_lib().llama_vocab_is_eog(self.vocab, token))

    def eog_ids(self) -> list[int]:
        return [t for t in range(self.n_vocab) if self.is_eog(t)]

    def bos_id(self) -> int | None:
        bos = int(_lib().llama_vocab_bos(self.vocab))
        return bos if bos >= 0 else None

    def eos_id(self) -> int | None:
        eos = int(_lib().llama_vocab_eos(self.vocab))
        return eos if eos >= 0 else None

    def adds_bos(self) -> bool:
        return bool(_lib().llama_vocab_get_add_bos(self.vocab))


@dataclass
class Entry:
    """One token of a llama.cpp batch: its id, position, sequence and whether its logits are wanted."""

    token: int
    pos: int
    seq: int
    logits: bool


class Context:
    """A llama.cpp context on a model: `n_seq` sequences, each with `seq_ctx` positions of KV cache."""

    def __init__(
        self,
        model: GGUFModel,
        n_seq: int = 1,
        seq_ctx: int = 2048,
        n_batch: int = 2048,
        threads: int | None = None,
        lora: Any = None,
        flash_attention: bool | None = None,
    ):
        """`flash_attention`: None lets llama.cpp decide (on for CPU); `tuning.choose_flash_attention` measures."""
        L = _lib()
        self.model = model
        self.n_seq = n_seq
        self.seq_ctx = seq_ctx
        self.n_batch = n_batch
        params = L.llama_context_default_params()
        params.n_ctx = seq_ctx * n_seq
        params.n_batch = n_batch
        params.n_ubatch = min(512, n_batch)
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.flash_attn_type = -1 if flash_attention is None else int(flash_attention)  # auto / off / on
        params.n_threads = params.n_threads_batch = threads or default_threads()
        params.no_perf = True
        ptr = L.llama_init_from_model(model.ptr, params)
        if not ptr:
            raise UserError(f"llama.cpp could not create a context ({n_seq} x {seq_ctx} tokens) for {model.path}")
        self.ptr = ptr
        self.memory = L.llama_get_memory(ptr)
        self._batch = L.llama_batch_init(n_batch, 0, 1)
        self._outputs: np.ndarray | None = None  # the last decode's logits, one row per entry that asked
        self._output_row: dict[int, int] = {}  # batch row -> row of `_outputs`
        if lora is not None:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(lora)
            scales = (ctypes.c_float * 1)(1.0)
            if L.llama_set_adapters_lora(ptr, adapters, 1, scales) != 0:
                raise UserError("llama.cpp refused the LoRA adapter for this model")

    def close(self) -> None:
        L = _lib()
        if getattr(self, "ptr", None):
            L.llama_batch_free(self._batch)
            L.llama_free(self.ptr)
            self.ptr = None

    def __del__(self):  # pragma: no cover
        with contextlib.suppress(Exception):
            self.close()

    def clear(self, seq: int = -1) -> None:
        """Forget a sequence's KV cache (-1: every sequence)."""
        _lib().llama_memory_seq_rm(self.memory, seq, -1, -1)

    def trim(self, seq: int, start: int) -> bool:
        """Forget a sequence's KV cache from position `start` on; False where the cache cannot cut a tail."""
        return bool(_lib().llama_memory_seq_rm(self.memory, seq, start, -1))

    def decode(self, entries: list[Entry]) -> list[int]:
        """Run one batch; returns, per entry that asked for logits, its row index for `logits()`."""
        if not entries:
            return []
        if len(entries) > self.n_batch:
            raise ValueError(f"batch of {len(entries)} tokens exceeds n_batch {self.n_batch}")
        b = self._batch
        rows: list[int] = []
        for i, e in enumerate(entries):
            b.token[i] = e.token
            b.pos[i] = e.pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = e.seq
            b.logits[i] = 1 if e.logits else 0
            if e.logits:
                rows.append(i)
        b.n_tokens = len(entries)
        self._outputs = None
        rc = _lib().llama_decode(self.ptr, b)
        if rc != 0:
            # llama.cpp: 1 = no KV cache room for the batch, -1 = invalid batch (token ids, positions, sequences)
            why = "no room left in the KV cache" if rc == 1 else "the batch is invalid (llama.cpp's log says why)"
            raise RuntimeError(f"llama_decode failed ({rc}): {why}")
        self._output_row = {batch_row: k for k, batch_row in enumerate(rows)}
        return rows

    def logits(self, row: int) -> np.ndarray:
        """A copy of the logits of batch row `row` from the last decode."""
        return self.outputs()[self._output_row[row]].copy()

    def outputs(self) -> np.ndarray:
        """The last decode's logits, one row per entry that asked for them, in batch order (a view into
        llama.cpp's buffer: valid until the next decode)."""
        if self._outputs is None:
            # One foreign call per decode, not one per row: every ctypes call gives up the GIL and must win it
            # back. llama.cpp stores the asked-for rows contiguously, in batch order.
            ptr = _lib().llama_get_logits(self.ptr)
            self._outputs = np.ctypeslib.as_array(ptr, shape=(len(self._output_row), self.model.n_vocab))
        return self._outputs


def load_lora(model: GGUFModel, path: str | Path) -> Any:
    """A llama.cpp LoRA adapter GGUF on `model` (freed with the model)."""
    ptr = _lib().llama_adapter_lora_init(model.ptr, str(path).encode())
    if not ptr:
        raise UserError(f"llama.cpp could not load the LoRA adapter {path} on {model.path}")
    return ptr
