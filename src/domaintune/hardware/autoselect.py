"""`precision: auto` and `num_threads: auto`: settings chosen from the hardware in front of us, with why.

Defaults tuned on one CPU are wrong on the next: bf16 is fast only where the CPU does it natively
(AVX-512-BF16 or AMX) and 5-7x slower than fp32 where it is emulated; a thread per logical CPU
oversubscribes hyper-threaded cores and ignores container CPU limits. Every choice returns the
value and a sentence saying why, recorded in each stage's report.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from domaintune.hardware.probe import Hardware, detect_hardware, onednn_isa_cap

AUTO = "auto"
# A stage's `num_threads`: a count, or `auto` (null means the same: one per usable physical core).
ThreadCount = Annotated[int, Field(ge=1)] | Literal["auto"] | None


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str
    warning: str | None = None

    def describe(self) -> dict[str, Any]:
        out = {"value": self.value, "reason": self.reason}
        if self.warning:
            out["warning"] = self.warning
        return out


def _affinity() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def _physical_core_of_each_cpu() -> dict[int, tuple[str, str]]:
    """logical CPU -> (package, core) from sysfs; empty where the kernel does not say."""
    out = {}
    for cpu_dir in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        topo = cpu_dir / "topology"
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            continue
        out[int(cpu_dir.name[3:])] = (package, core)
    return out


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup v2 (`cpu.max`) or v1 (`cfs_quota_us`) quota; None when unlimited."""
    candidates = [
        (Path("/sys/fs/cgroup/cpu.max"), None),
        (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")),
    ]
    for quota_path, period_path in candidates:
        try:
            if period_path is None:
                quota_text, period_text = quota_path.read_text().split()[:2]
            else:
                quota_text, period_text = quota_path.read_text().strip(), period_path.read_text().strip()
        except (OSError, ValueError):
            continue
        if quota_text in ("max", "-1"):
            return None
        return max(int(quota_text) / int(period_text), 1.0)
    return None


def usable_physical_cores() -> tuple[int, str]:
    """Physical cores this process may run on (affinity, SMT siblings and cgroup quota considered)."""
    allowed = _affinity()
    topology = _physical_core_of_each_cpu()
    cores = {topology[c] for c in allowed if c in topology}
    count = len(cores) if cores else len(allowed)
    why = f"{count} physical core(s) among {len(allowed)} CPU(s) this process may use"
    limit = _cgroup_cpu_limit()
    if limit is not None and math.ceil(limit) < count:
        count = math.ceil(limit)
        why += f", capped by the cgroup CPU quota ({limit:g} CPUs)"
    return max(count, 1), why


def choose_threads(requested: int | str | None) -> Choice:
    """An explicit count is kept; `auto` (or None) is one thread per usable physical core, shared among the
    processes torchrun started on this machine (LOCAL_WORLD_SIZE)."""
    if requested not in (None, AUTO):
        return Choice(int(requested), "set in the config")
    count, why = usable_physical_cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        share = max(count // local, 1)
        return Choice(share, f"auto: {why}, shared by {local} processes on this machine")
    return Choice(count, f"auto: {why}")


def apply_threads(requested: int | str | None) -> Choice:
    """`choose_threads`, then torch.set_num_threads with the count; returns the choice (for the stage's report)."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.value)
    return choice


def choose_precision(requested: str, device: str = "cpu", hardware: Hardware | None = None) -> Choice:
    """bf16 where the hardware does it natively, fp16 on GPUs without bf16, fp32 otherwise."""
    if device == "cuda":
        return _cuda_precision(requested)
    hardware = hardware or detect_hardware()
    native = hardware.cpu_bf16
    lacks = _why_no_native_bf16(hardware)
    if requested == AUTO:
        if native:
            return Choice("bf16", f"auto: {hardware.cpu_model} has native bf16 (AVX-512-BF16/AMX)")
        return Choice("fp32", f"auto: {hardware.cpu_model} {lacks}")
    if requested == "bf16" and not native:
        penalty = measure_bf16_penalty()
        return Choice(
            "bf16",
            "set in the config",
            f"train.precision bf16 on {hardware.cpu_model}, which {lacks}: bf16 matmuls are "
            f"emulated here, measured {penalty:.1f}x slower than fp32; `precision: auto` would pick fp32",
        )
    return Choice(requested, "set in the config")


def _why_no_native_bf16(hardware: Hardware) -> str:
    cap = onednn_isa_cap()
    if cap and {"avx512_bf16", "amx_bf16"} & hardware.cpu_flags:
        return (
            f"has AVX-512-BF16/AMX but ONEDNN_MAX_CPU_ISA={cap} keeps torch's kernels from using them (no native bf16)"
        )
    return "has no native bf16 (no AVX-512-BF16 or AMX)"


def _cuda_precision(requested: str) -> Choice:
    import torch

    name = torch.cuda.get_device_name(0)
    bf16 = torch.cuda.is_bf16_supported()
    if requested != AUTO:
        return Choice(requested, "set in the config")
    if bf16:
        return Choice("bf16", f"auto: {name} supports bf16")
    return Choice("fp16", f"auto: {name} has no bf16; fp16 with loss scaling")


def measure_bf16_penalty(seconds: float = 0.25, shape: tuple[int, int, int] = (512, 576, 1536)) -> float:
    """fp32 matmul throughput over bf16 on this CPU with one thread (>1 means bf16 is slower)."""
    import torch

    def rate(dtype: torch.dtype) -> float:
        m, k, n = shape
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.mm(a, b)  # warm-up: first call pays for kernel selection
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            torch.mm(a, b)
            runs += 1
        return runs / (time.perf_counter() - start)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rate(torch.float32) / rate(torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
