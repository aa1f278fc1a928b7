"""`train.precision: auto` / `num_threads: auto` are settled before anything reads them, with a warning for bf16
forced on a CPU that only emulates it."""

from __future__ import annotations

import logging

import pytest

from domaintune.hardware import autoselect
from domaintune.hardware.probe import Hardware
from domaintune.train import runner, speed
from train_helpers import tiny_config

WITH_AMX = Hardware("Intel Xeon Platinum 8488C", 2, 24.0, {"avx512f", "amx_bf16", "amx_tile"})
WITHOUT_BF16 = Hardware("Intel Xeon Platinum 8259CL", 2, 24.0, {"avx512f", "avx512vnni"})


@pytest.fixture(autouse=True)
def _cpu_only(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("hardware", "precision", "base_dtype"), [(WITHOUT_BF16, "fp32", "float32"), (WITH_AMX, "bf16", "bfloat16")]
)
def test_auto_settles_precision_and_threads_for_the_cpu(monkeypatch, hardware, precision, base_dtype):
    monkeypatch.setattr(autoselect, "detect_hardware", lambda: hardware)
    cfg, chosen = runner._choose_for_this_machine(tiny_config(precision="auto", num_threads="auto"))
    assert cfg.train.precision == precision
    assert chosen["precision"].reason.startswith("auto: ") and hardware.cpu_model in chosen["precision"].reason
    assert cfg.train.num_threads == autoselect.usable_physical_cores()[0]
    assert "physical core" in chosen["num_threads"].describe()["reason"]
    # Everything after reads the settled value: the frozen base is held in bf16 only where bf16 is chosen.
    assert speed.base_dtype(cfg.train, "float32") == base_dtype


def test_forced_bf16_on_a_cpu_without_it_is_kept_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(autoselect, "detect_hardware", lambda: WITHOUT_BF16)
    monkeypatch.setattr(autoselect, "measure_bf16_penalty", lambda: 5.5)
    with caplog.at_level(logging.WARNING, logger="domaintune.train.runner"):
        cfg, chosen = runner._choose_for_this_machine(tiny_config(precision="bf16", num_threads=1))
    assert cfg.train.precision == "bf16" and cfg.train.num_threads == 1
    assert "5.5x slower than fp32" in caplog.text
    assert chosen["precision"].describe()["warning"].startswith("train.precision bf16 on Intel Xeon Platinum 8259CL")
