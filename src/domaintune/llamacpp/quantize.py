"""GGUF quantisation by llama.cpp's own quantiser (`llama_model_quantize`), from an f16/f32 GGUF."""

from __future__ import annotations

from pathlib import Path

from domaintune.errors import UserError
from domaintune.llamacpp.runtime import default_threads, init_backend

# Every GGUF type domaintune builds: converter types come straight from convert_hf_to_gguf.py, the
# others are quantised from the f16 file.
QUANTISER_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
}
GGUF_TYPES = ("f16", "q8_0", "q4_k_m", "q5_k_m")


def check_gguf_type(qtype: str) -> None:
    if qtype not in GGUF_TYPES:
        raise UserError(f"GGUF type {qtype!r} is not one domaintune builds; types: {', '.join(GGUF_TYPES)}")


def quantize(src: Path, dst: Path, qtype: str, threads: int | None = None) -> Path:
    """Quantise the GGUF `src` (f16 or f32) to `qtype` in `dst` (written beside it, then renamed)."""
    import llama_cpp as L

    if qtype not in QUANTISER_TYPES:
        raise UserError(f"llama.cpp's quantiser is used for {', '.join(QUANTISER_TYPES)}, not {qtype!r}")
    init_backend()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial")
    params = L.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = getattr(L, QUANTISER_TYPES[qtype])
    rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"llama.cpp could not quantise {src} to {qtype} (llama_model_quantize returned {rc})")
    tmp.replace(dst)
    return dst
