"""The AMX probe's child process (`probe.py` runs it): load a GGUF with llama.cpp's extra buffers, decode one
batch, print whether AMX buffers were made. Apart from `probe.py` so that the probe never imports the runtime
it guards (the runtime asks the probe).

    python -m domaintune.llamacpp.probe_child MODEL.gguf   # prints {"amx": true|false}
"""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("domaintune.llamacpp")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _child(model_path: str) -> None:
    """Load with the AMX buffers, decode one 16-token batch, report whether AMX buffers were made."""
    from domaintune.llamacpp.runtime import Context, Entry, GGUFModel

    collect = _Collect()
    log.addHandler(collect)
    log.setLevel(logging.DEBUG)
    model = GGUFModel(model_path)
    ctx = Context(model, n_seq=1, seq_ctx=64, n_batch=64)
    ctx.decode([Entry(t % model.n_vocab, t, 0, t == 15) for t in range(16)])
    used = any("AMX" in line for line in collect.lines)
    print(json.dumps({"amx": used}))


if __name__ == "__main__":
    _child(sys.argv[1])
