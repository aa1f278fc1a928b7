"""`precision: auto` and `num_threads: auto` follow the hardware, and say why."""

from __future__ import annotations

import os

import pytest

from domaintune.hardware import autoselect
from domaintune.hardware.autoselect import choose_precision, choose_threads, usable_physical_cores
from domaintune.hardware.probe import Hardware

WITH_BF16 = Hardware("AMD EPYC 9R14", 2, 24.0, {"avx512f", "avx512_bf16"})
WITH_AMX = Hardware("Intel Xeon Platinum 8488C", 2, 24.0, {"avx512f", "amx_bf16", "amx_tile"})
WITHOUT_BF16 = Hardware("Intel Xeon Platinum 8259CL", 2, 24.0, {"avx512f", "avx512vnni"})


@pytest.mark.parametrize(("hardware", "expected"), [(WITH_BF16, "bf16"), (WITH_AMX, "bf16"), (WITHOUT_BF16, "fp32")])
def test_auto_precision_uses_bf16_only_where_it_is_native(hardware, expected):
    choice = choose_precision("auto", "cpu", hardware)
    assert choice.value == expected
    assert hardware.cpu_model in choice.reason and choice.warning is None


def test_forced_bf16_without_native_support_is_kept_but_warned_with_the_measured_penalty(monkeypatch):
    monkeypatch.setattr(autoselect, "measure_bf16_penalty", lambda: 6.2)
    choice = choose_precision("bf16", "cpu", WITHOUT_BF16)
    assert choice.value == "bf16"
    assert choice.warning and "6.2x slower" in choice.warning and "Platinum 8259CL" in choice.warning


@pytest.mark.parametrize("isa", ["AVX512_CORE_VNNI", "avx512_core", "AVX2"])
def test_a_onednn_isa_cap_below_bf16_makes_auto_pick_fp32(monkeypatch, isa):
    # ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 turns torch's bf16 kernels into emulation even on an AMX CPU
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert not WITH_AMX.cpu_bf16
    choice = choose_precision("auto", hardware=WITH_AMX)
    assert choice.value == "fp32" and f"ONEDNN_MAX_CPU_ISA={isa.upper()}" in choice.reason


def test_a_onednn_isa_cap_that_keeps_bf16_changes_nothing(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert choose_precision("auto", hardware=WITH_AMX).value == "bf16"


def test_forced_precision_on_a_native_cpu_is_kept_quietly():
    assert choose_precision("fp32", "cpu", WITH_BF16).describe() == {"value": "fp32", "reason": "set in the config"}


def test_explicit_threads_are_kept_and_auto_counts_physical_cores():
    assert choose_threads(3).value == 3
    auto = choose_threads("auto")
    assert auto.value == usable_physical_cores()[0]
    assert 1 <= auto.value <= len(os.sched_getaffinity(0))
    assert "physical core" in auto.reason


def test_smt_siblings_count_once(monkeypatch):
    monkeypatch.setattr(autoselect, "_affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(
        autoselect, "_physical_core_of_each_cpu", lambda: {0: ("0", "0"), 1: ("0", "1"), 2: ("0", "0"), 3: ("0", "1")}
    )
    monkeypatch.setattr(autoselect, "_cgroup_cpu_limit", lambda: None)
    assert usable_physical_cores()[0] == 2


def test_a_cgroup_quota_caps_the_threads(monkeypatch):
    monkeypatch.setattr(autoselect, "_affinity", lambda: set(range(8)))
    monkeypatch.setattr(autoselect, "_physical_core_of_each_cpu", lambda: {i: ("0", str(i)) for i in range(8)})
    monkeypatch.setattr(autoselect, "_cgroup_cpu_limit", lambda: 1.5)
    count, why = usable_physical_cores()
    assert count == 2 and "cgroup" in why


def test_bf16_penalty_is_a_positive_ratio():
    assert autoselect.measure_bf16_penalty(seconds=0.02, shape=(64, 64, 64)) > 0


def test_auto_threads_are_shared_among_the_torchrun_processes_of_a_machine(monkeypatch):
    monkeypatch.setattr(autoselect, "usable_physical_cores", lambda: (8, "8 physical core(s)"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    choice = choose_threads("auto")
    assert choice.value == 2 and "shared by 4 processes" in choice.reason
    assert choose_threads(None).value == 2  # null means auto
    assert choose_threads(3).value == 3


def test_apply_threads_sets_torch_and_says_why(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        choice = autoselect.apply_threads(1)
        assert torch.get_num_threads() == 1 and choice.describe() == {"value": 1, "reason": "set in the config"}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_a_gpu_is_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Tesla T4" if not bf16 else "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    choice = choose_precision("auto", "cuda")
    assert choice.value == expected and ("H200" in choice.reason or "T4" in choice.reason)
    assert choose_precision("fp32", "cuda").value == "fp32"


@pytest.mark.parametrize("value", ["auto", None, 2])
def test_every_stage_takes_auto_or_a_count_of_threads(value):
    from domaintune.config import config_from_dict

    sections = {s: {"num_threads": value} for s in ("train", "eval", "export", "serve")}
    cfg = config_from_dict({"name": "t", **sections})
    assert {getattr(cfg, s).num_threads for s in sections} == {value}


def test_threads_below_one_are_refused():
    from pydantic import ValidationError

    from domaintune.train.config import TrainConfig

    with pytest.raises(ValidationError):
        TrainConfig(num_threads=0)
    assert TrainConfig().num_threads == "auto" and TrainConfig().precision == "auto"


@pytest.mark.parametrize(("hardware", "expected"), [(WITH_AMX, "bf16"), (WITHOUT_BF16, "fp32")])
def test_estimate_plans_in_the_precision_auto_picks(monkeypatch, hardware, expected):
    from domaintune.config import config_from_dict
    from domaintune.hardware import plan

    monkeypatch.setattr(plan, "detect_hardware", lambda: hardware)
    monkeypatch.setattr(plan, "measure_cpu_flops", lambda precision: 1e11)
    cfg = config_from_dict({"name": "t", "model": {"name_or_path": "tiny-random-llama"}, "train": {"max_steps": 2}})
    result = plan.plan_estimates(cfg, gpus=["A100-80G"])
    assert f"precision {expected}" in result.header
    assert f"({expected})" in result.targets[0].name
