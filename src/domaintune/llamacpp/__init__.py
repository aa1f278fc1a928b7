"""llama.cpp inside the loop: GGUF conversion by llama.cpp's own converter, quantisation by its quantiser,
loading, verification against the merged Hugging Face model, and batched CPU generation.

Everything here needs the `llama-cpp-python` package (built for the CPU by `scripts/setup.sh`) and,
for conversion, llama.cpp's `convert_hf_to_gguf.py` with its `gguf-py`, which setup.sh extracts from
the same llama-cpp-python source release into `~/.cache/domaintune/llama.cpp/<version>/`. When either is
missing, `unavailable_reason()` / `converter_unavailable_reason()` say why in one line and callers fall
back to transformers.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

# The llama-cpp-python release whose llama.cpp tree (converter, gguf-py) scripts/setup.sh extracts.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"


@lru_cache(maxsize=1)
def installed_version() -> str | None:
    """The installed llama-cpp-python version, or None (read from package metadata: no import)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def unavailable_reason() -> str | None:
    """Why llama.cpp cannot run here (one line), or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (bash scripts/setup.sh builds it for this CPU)"
    try:
        import llama_cpp  # noqa: F401  (loads libllama: fails when the build does not fit this CPU)
    except (OSError, RuntimeError) as exc:
        return f"llama-cpp-python is installed but its library does not load: {exc}"
    return None


def available() -> bool:
    return unavailable_reason() is None


def converter_unavailable_reason() -> str | None:
    """Why GGUF conversion cannot run here, or None when it can."""
    from domaintune.llamacpp.tools import converter_unavailable_reason as reason

    return reason()
