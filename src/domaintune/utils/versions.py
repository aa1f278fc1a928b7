"""The library versions recorded with every trained, exported and registered model."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

RECORDED_PACKAGES = (
    "domaintune",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "safetensors",
    "gguf",
)


def library_versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    """Python's version and each installed package's; packages that are not installed are left out."""
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
