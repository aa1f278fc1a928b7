"""Facts about the machine: CPU features, memory, accelerators, installed libraries."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass, field


@dataclass
class Hardware:
    cpu_model: str
    cpu_cores: int
    memory_gib: float
    cpu_flags: set[str] = field(default_factory=set)
    cuda_devices: list[tuple[str, float]] = field(default_factory=list)  # (name, memory GiB)

    @property
    def cpu_bf16(self) -> bool:
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags) and onednn_isa_cap() is None


# oneDNN (torch's bf16 CPU kernels) ISAs without bf16 dot products: ONEDNN_MAX_CPU_ISA set to one of these makes
# bf16 matmuls emulated (5-7x slower than fp32) even on a CPU that has AVX-512-BF16/AMX.
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def onednn_isa_cap() -> str | None:
    """`ONEDNN_MAX_CPU_ISA` when it caps oneDNN below bf16 (the CPU then behaves as one without native bf16)."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    return value if value in ONEDNN_ISAS_WITHOUT_BF16 else None


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name") and model in ("", "unknown", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return model, flags


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return 0.0


def detect_hardware() -> Hardware:
    model, flags = _cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cuda: list[tuple[str, float]] = []
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(index)
                cuda.append((props.name, props.total_memory / 1024**3))
    return Hardware(cpu_model=model, cpu_cores=cores, memory_gib=_memory_gib(), cpu_flags=flags, cuda_devices=cuda)


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
