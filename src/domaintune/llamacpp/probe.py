"""Does llama.cpp's AMX matmul run with the installed build, and keep running when PyTorch uses AMX in the
same process? Asked in a child process, because the answer for a broken build is a fatal signal.

llama-cpp-python 0.3.36 has two AMX faults, both fixed by scripts/patches/ for setup.sh's build. Built by
GCC 12 from unpatched source it dies on its first AMX batch: GCC 12's `_tile_loadconfig` tells the compiler
it reads 8 bytes of the tile configuration, so the stores of the rest are dropped and `ldtilecfg` faults on
stack garbage (SIGSEGV). And it loads each thread's tile configuration once (a thread-local flag), while
PyTorch's oneDNN releases the tiles after its own AMX kernels on the same thread (the calling thread belongs
to both OpenMP teams), so llama.cpp's next tile instruction after any bf16 training or scoring step in the
process raises SIGILL. Another build (GCC 13+, a distribution's, a later release) may well work, so it is
tried, not assumed: the child loads the GGUF with the AMX buffers, decodes one batch, runs a PyTorch bf16
matmul on the same thread and decodes the batch again (the logits must not change). The verdict is cached
per library build (path, size, modification time) once a probe has really used AMX.

    python -m domaintune.llamacpp.probe_child MODEL.gguf   # the child: prints {"amx": ..., "stable": ...}
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("domaintune.llamacpp")

PROBE_TIMEOUT_S = 300
_LOCK = threading.Lock()
_SEEN: dict[str, bool] = {}  # this process's verdicts, by library key or model path


def library_key() -> str | None:
    """Identity of the installed llama.cpp CPU backend (path, size, mtime), or None when not found."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.origin:
        return None
    libs = sorted((Path(spec.origin).parent / "lib").glob("libggml-cpu*.so*"))
    if not libs:
        return None
    st = libs[0].stat()
    return f"{libs[0]}:{st.st_size}:{st.st_mtime_ns}"


def state_file(name: str) -> Path:
    """A verdict file of this package, beside the model cache (~/.cache/domaintune/<name>)."""
    env = os.environ.get("DOMAINTUNE_CACHE")
    base = Path(env).parent if env else Path.home() / ".cache" / "domaintune"
    return base / name


def read_state(path: Path) -> dict[str, Any]:
    """The verdicts in `path` by key; {} when it is missing or unreadable (they are measured again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(path: Path, key: str, value: Any) -> None:
    """Add one verdict to `path` (written to a temporary file first, so readers never see half of it)."""
    data = read_state(path)
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def cache_file() -> Path:
    # v2: the probe runs a PyTorch matmul between two decodes. Verdicts of the first probe (one decode) said
    # "works" for builds that die once PyTorch has used AMX in the process, so they are not read.
    return state_file("llamacpp-amx-probe-v2.json")


def probe_amx(model_path: Path) -> bool:
    """Whether the AMX matmul may be used for `model_path` (cached; see the module docstring)."""
    lib = library_key()
    if lib is None:
        return False
    with _LOCK:
        if lib in _SEEN:
            return _SEEN[lib]
        cached = read_state(cache_file()).get(lib)
        if cached is not None:
            _SEEN[lib] = bool(cached)
            return bool(cached)
        model_key = f"{lib}|{model_path.resolve()}"
        if model_key in _SEEN:
            return _SEEN[model_key]
        outcome = _run_child(model_path)
        if outcome in ("amx", "crash", "unstable"):  # the build's verdict
            works = outcome == "amx"
            _SEEN[lib] = works
            write_state(cache_file(), lib, works)
            if not works:
                log.warning(
                    "llama.cpp's AMX matmul %s in a probe on %s: AMX stays off (slower batches). The build is "
                    "likely one without scripts/patches/; bash scripts/setup.sh builds a patched one (a new "
                    "build is probed anew).",
                    "crashed" if outcome == "crash" else "changed its answer after a PyTorch matmul",
                    model_path,
                )
            return works
        # no weight of this model takes the AMX path ("no-amx"; safe), or the child failed for another
        # reason ("error": the model's own load will say why): nothing learnt about the build
        _SEEN[model_key] = outcome == "no-amx"
        return _SEEN[model_key]


def child_command(model_path: Path) -> list[str]:
    return [sys.executable, "-m", "domaintune.llamacpp.probe_child", str(model_path)]


def _run_child(model_path: Path) -> str:
    """One probe in a child process: "amx" (ran on AMX, the same logits before and after PyTorch's matmul),
    "unstable" (ran on AMX, other logits after it), "no-amx" (ran, no AMX-shaped weights), "crash" (killed
    by a signal, a broken build's symptom) or "error" (failed otherwise, or timed out)."""
    env = {**os.environ, "DOMAINTUNE_LLAMACPP_EXTRA_BUFFERS": "1"}
    try:
        done = subprocess.run(
            child_command(model_path), env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        log.warning("the llama.cpp AMX probe on %s took over %d s: AMX off for it", model_path, PROBE_TIMEOUT_S)
        return "error"
    if done.returncode < 0:
        return "crash"
    try:
        verdict = json.loads(done.stdout.strip().splitlines()[-1])
        used, stable = bool(verdict["amx"]), bool(verdict["stable"])
    except (ValueError, KeyError, IndexError, TypeError):
        log.debug("AMX probe on %s failed (exit %d): %s", model_path, done.returncode, done.stderr[-2000:])
        return "error"
    if not used:
        return "no-amx"
    return "amx" if stable else "unstable"
