"""The AMX probe's child process (`probe.py` runs it): load a GGUF with llama.cpp's extra buffers, decode one
batch, run a PyTorch bf16 matmul on the same thread, decode the batch again, and print whether AMX buffers
were made and whether the two decodes agree. Apart from `probe.py` so that the probe never imports the
runtime it guards (the runtime asks the probe).

    python -m domaintune.llamacpp.probe_child MODEL.gguf   # prints {"amx": true|false, "stable": true|false}
"""

from __future__ import annotations

import json
import logging
import sys

import numpy as np

log = logging.getLogger("domaintune.llamacpp")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _torch_amx_matmul() -> None:
    """A bf16 matmul by PyTorch's oneDNN, on this (the calling) thread: on an AMX CPU it leaves the thread's
    tiles released or configured its own way, as every training or scoring step in the same process does.
    An unpatched llama.cpp then runs its tile instructions unconfigured (SIGILL; scripts/patches/)."""
    import torch

    a = torch.ones(256, 256, dtype=torch.bfloat16)
    float((a @ a).sum())


def _child(model_path: str) -> None:
    """Decode one 16-token batch with the AMX buffers, let PyTorch use AMX on the same thread, decode it again."""
    from domaintune.llamacpp.runtime import Context, Entry, GGUFModel

    collect = _Collect()
    log.addHandler(collect)
    log.setLevel(logging.DEBUG)
    model = GGUFModel(model_path)
    ctx = Context(model, n_seq=1, seq_ctx=64, n_batch=64)
    batch = [Entry(t % model.n_vocab, t, 0, t == 15) for t in range(16)]
    row = ctx.decode(batch)[0]
    first = ctx.logits(row)
    ctx.clear()
    _torch_amx_matmul()
    ctx.decode(batch)
    stable = bool(np.array_equal(first, ctx.logits(row)))
    used = any("AMX" in line for line in collect.lines)
    print(json.dumps({"amx": used, "stable": stable}))


if __name__ == "__main__":
    _child(sys.argv[1])
