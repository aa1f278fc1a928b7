"""Fixtures of the llama.cpp tests: skipped with a reason where llama-cpp-python or the converter is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason


def _family_cache() -> Path:
    # Built once per machine (seconds each) and reused: the folders depend only on this version string.
    base = Path(os.environ.get("DOMAINTUNE_CACHE", Path.home() / ".cache" / "domaintune" / "models"))
    return base / "test-families-v1"


@pytest.fixture(scope="session")
def llamacpp_ready() -> None:
    reason = unavailable_reason() or converter_unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def family_cache() -> Path:
    return _family_cache()


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")
