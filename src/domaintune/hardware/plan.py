"""Turns a project config into estimate targets: this machine plus any named GPUs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from domaintune.hardware.autoselect import AUTO, choose_precision, choose_threads
from domaintune.hardware.estimate import (
    METHODS,
    NAMED_GPUS,
    Estimate,
    RunShape,
    count_tokens_in_split,
    estimate_all,
    measure_cpu_flops,
    model_shape_from_config,
)
from domaintune.hardware.probe import detect_hardware

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


@dataclass
class Target:
    name: str
    device: str
    memory_gib: float
    peak_tflops: float
    estimates: list[Estimate] = field(default_factory=list)

    def supported(self, method: str) -> bool:
        return self.device == "gpu" or method != "qlora"


@dataclass
class Plan:
    header: str
    targets: list[Target]
    footer: str


def run_shape_from_config(cfg: ProjectConfig) -> RunShape:
    train = cfg.train
    return RunShape(
        seq_len=train.max_length,
        batch_size=train.batch_size,
        grad_accum=train.gradient_accumulation_steps,
        lora_r=train.lora.r,
        freeze_trainable_layers=train.freeze.trainable_layers,
        num_virtual_tokens=train.prompt_learning.num_virtual_tokens,
        gradient_checkpointing=train.gradient_checkpointing,
        precision=train.precision,
    )


def plan_estimates(cfg: ProjectConfig, gpus: list[str]) -> Plan:
    from domaintune.model.loader import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model)  # a config.json is all we read from it
    shape = model_shape_from_config(model_dir)
    run = run_shape_from_config(cfg)
    train_file = cfg.layout.train_file
    tokens = count_tokens_in_split(train_file, model_dir, run.seq_len)
    epochs = cfg.train.epochs
    max_steps = cfg.train.max_steps
    if max_steps:
        run.total_tokens = max_steps * run.batch_size * run.grad_accum * run.seq_len
        tokens_note = f"{max_steps} steps x {run.batch_size * run.grad_accum} rows x <= {run.seq_len} tokens"
    elif tokens is not None:
        run.total_tokens = int(tokens * epochs)
        tokens_note = f"{tokens:,} tokens in {train_file} x {epochs} epochs"
    else:
        tokens_note = f"no {train_file} yet: run `domaintune data` first for run times"

    hardware = detect_hardware()
    requested = run.precision
    targets: list[Target] = []
    if hardware.cuda_devices:
        name, memory = hardware.cuda_devices[0]
        peak = next((tf for gpu, (tf, _) in NAMED_GPUS.items() if gpu.split("-")[0] in name), 100.0)
        targets.append(Target(f"this machine: {name}", "gpu", memory, peak))
    else:
        import torch

        chosen = choose_precision(run.precision, "cpu", hardware).value if run.precision == AUTO else run.precision
        precision = "bf16" if chosen == "bf16" and hardware.cpu_bf16 else "fp32"
        run.precision = precision  # bf16 without AVX-512-BF16/AMX runs at fp32 speed or worse
        threads = choose_threads(cfg.train.num_threads).value
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            flops = measure_cpu_flops(precision)
        finally:
            torch.set_num_threads(previous)
        targets.append(
            Target(f"this machine: CPU, {threads} thread(s) ({precision})", "cpu", hardware.memory_gib, flops / 1e12)
        )
    for gpu in gpus:
        peak, memory = NAMED_GPUS[gpu]
        targets.append(Target(gpu, "gpu", memory, peak))
    for target in targets:
        # `auto` on a GPU is bf16 (fp16 on old ones: the same memory and datasheet speed)
        gpu_precision = "bf16" if requested == AUTO else requested
        target_run = replace(run, precision=gpu_precision) if target.device == "gpu" else run
        target.estimates = estimate_all(shape, target_run, target.device, target.peak_tflops * 1e12, METHODS)
    header = (
        f"model {cfg.model.name_or_path}: {shape.params / 1e6:.1f}M parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}; sequence {run.seq_len}, batch {run.batch_size} x accumulation {run.grad_accum}, "
        f"precision {run.precision}, gradient checkpointing {'on' if run.gradient_checkpointing else 'off'}\n"
        f"run size: {tokens_note}"
    )
    footer = (
        "Memory = weights + gradients + AdamW states + activations + logits + runtime; "
        "time = FLOPs per token (6P full, 4P frozen base, +2P checkpointing) / usable FLOP/s. "
        "Estimates, not measurements: leave ~10% headroom."
    )
    return Plan(header, targets, footer)
