"""llama.cpp's own Python tools: `convert_hf_to_gguf.py` and `convert_lora_to_gguf.py` with their `gguf-py`.

The llama-cpp-python wheel carries the library but not these scripts; `scripts/setup.sh` extracts them
from the same release's source archive into `~/.cache/domaintune/llama.cpp/<version>/` (outside the
clone). They run in a child process with the vendored `gguf-py` first on the path (the converter does
that itself), so their gguf version never mixes with the one the rest of domaintune imports.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache
from pathlib import Path

from domaintune.errors import UserError
from domaintune.llamacpp import LLAMA_CPP_PYTHON_VERSION, installed_version
from domaintune.llamacpp.vocab import restore_token_types

CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"
# Types the converter writes directly; the rest come from llama.cpp's quantiser (quantize.py).
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class ConversionError(UserError):
    """llama.cpp's converter refused or failed; the message carries its last log lines."""


def tools_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "domaintune" / "llama.cpp"


def tools_dir() -> Path:
    """Where the converter lives: $DOMAINTUNE_LLAMACPP_TOOLS, else the cache folder of the installed version."""
    env = os.environ.get("DOMAINTUNE_LLAMACPP_TOOLS")
    if env:
        return Path(env)
    return tools_cache_root() / (installed_version() or LLAMA_CPP_PYTHON_VERSION)


def converter_unavailable_reason() -> str | None:
    folder = tools_dir()
    missing = [name for name in (CONVERTER, LORA_CONVERTER, "conversion", "gguf-py") if not (folder / name).exists()]
    if missing:
        return (
            f"llama.cpp's converter is not in {folder} (missing {', '.join(missing)}); "
            "bash scripts/setup.sh extracts it from the llama-cpp-python source release"
        )
    return None


def _require_converter() -> Path:
    reason = converter_unavailable_reason()
    if reason:
        raise UserError(reason)
    return tools_dir()


def _tail(text: str, lines: int = 12) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip() and "Writing:" not in line]
    return "\n".join(kept[-lines:])


_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _converter_pool() -> ProcessPoolExecutor:
    """Children forked from a fork server that has torch and transformers imported already.

    A fresh `python convert_hf_to_gguf.py` spends most of a small model's conversion importing torch
    and transformers (seconds); a child of this server starts with them loaded, and each conversion
    gets its own child (max_tasks_per_child=1), so no converter state outlives it.
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            import multiprocessing

            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["numpy", "torch", "transformers", "safetensors", "sentencepiece"])
            fresh_child: dict = {"max_tasks_per_child": 1}  # Python >= 3.11 (older ones use a subprocess)
            _POOL = ProcessPoolExecutor(max_workers=1, mp_context=ctx, **fresh_child)
        return _POOL


def _reset_pool() -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.shutdown(wait=False, cancel_futures=True)
        _POOL = None


def _run_in_child(folder: str, script: str, args: list[str]) -> tuple[int, str]:
    """Run one of llama.cpp's scripts as __main__ in this (forked) process, with its own gguf-py first."""
    import contextlib
    import io
    import logging
    import runpy
    import traceback

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("NO_LOCAL_GGUF", None)
    sys.path[:0] = [str(Path(folder) / "gguf-py"), folder]
    for name in [m for m in sys.modules if m == "gguf" or m.startswith("gguf.")]:
        del sys.modules[name]
    buf = io.StringIO()
    logging.basicConfig(stream=buf, level=logging.INFO, force=True)
    sys.argv = [str(Path(folder) / script), *args]
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    return code, buf.getvalue()


def run_tool(script: str, args: list[str], timeout_s: float = 3600) -> str:
    """Run one of llama.cpp's scripts; returns its log, raises ConversionError with the log's tail on failure.

    It runs in a child of a warm fork server (see `_converter_pool`), or as a plain subprocess when
    $DOMAINTUNE_LLAMACPP_SUBPROCESS=1.
    """
    folder = _require_converter()
    if os.environ.get("DOMAINTUNE_LLAMACPP_SUBPROCESS") == "1" or sys.version_info < (3, 11):
        code, log = _run_subprocess(folder, script, args, timeout_s)
    else:
        try:
            code, log = _converter_pool().submit(_run_in_child, str(folder), script, args).result(timeout=timeout_s)
        except BrokenProcessPool:  # the fork server could not start (e.g. __main__ is not a file): plain run
            _reset_pool()
            code, log = _run_subprocess(folder, script, args, timeout_s)
    if code != 0:
        raise ConversionError(f"llama.cpp {script} failed (exit {code}):\n{_tail(log)}")
    return log


def _run_subprocess(folder: Path, script: str, args: list[str], timeout_s: float) -> tuple[int, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(folder / "gguf-py"), str(folder)])
    env.setdefault("HF_HUB_OFFLINE", "1")  # conversion reads local folders only
    proc = subprocess.run(
        [sys.executable, str(folder / script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


@lru_cache(maxsize=4)
def _supported(folder: str) -> frozenset[str]:
    log = run_tool(CONVERTER, ["--print-supported-models"], timeout_s=300)
    names: set[str] = set()
    section = ""
    for line in log.splitlines():
        if line.rstrip().endswith("models:"):
            section = line.rsplit(":", 2)[-2].strip() if line.count(":") > 1 else line.strip()
        item = re.search(r"- (\w+)\s*$", line)
        if item and section.startswith("TEXT"):
            names.add(item.group(1))
    return frozenset(names)


def supported_architectures() -> frozenset[str]:
    """Every text architecture llama.cpp's converter handles (asked from the converter, not kept here)."""
    return _supported(str(_require_converter()))


def model_architectures(model_dir: Path) -> list[str]:
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return list(config.get("architectures") or [])


def check_convertible(model_dir: Path, timeout_s: float = 600) -> None:
    """Fail before building anything: the architecture is known to the converter and the tokenizer converts.

    Runs the converter with `--vocab-only` (tokenizer and metadata, no weights: seconds), which is where
    llama.cpp refuses an unknown BPE pre-tokenizer or a tokenizer it cannot read.
    """
    archs = model_architectures(model_dir)
    supported = supported_architectures()
    if not archs or not any(a in supported for a in archs):
        raise ConversionError(
            f"{model_dir}: llama.cpp's converter does not support architecture {archs or '(none in config.json)'}"
        )
    with tempfile.TemporaryDirectory(prefix="dt-vocab-") as tmp:
        run_tool(CONVERTER, [str(model_dir), "--vocab-only", "--outfile", str(Path(tmp) / "vocab.gguf")], timeout_s)


def convert_hf(model_dir: Path, out_path: Path, outtype: str = "f16", timeout_s: float = 3600) -> Path:
    """A Hugging Face folder (merged weights + tokenizer) -> one GGUF file, by llama.cpp's converter."""
    if outtype not in CONVERTER_OUTTYPES:
        raise UserError(f"the converter writes {', '.join(CONVERTER_OUTTYPES)}, not {outtype!r} (quantise from f16)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    run_tool(CONVERTER, [str(model_dir), "--outfile", str(tmp), "--outtype", outtype], timeout_s)
    restore_token_types(Path(model_dir), tmp)  # what the converter cannot read from a transformers 5 folder
    tmp.replace(out_path)
    return out_path


def convert_lora(adapter_dir: Path, base_dir: Path, out_path: Path, outtype: str = "f16") -> Path:
    """A PEFT LoRA adapter folder -> a llama.cpp LoRA adapter GGUF (applied at load time on the base GGUF)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.partial")
    run_tool(LORA_CONVERTER, [str(adapter_dir), "--base", str(base_dir), "--outfile", str(tmp), "--outtype", outtype])
    tmp.replace(out_path)
    return out_path
