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
    eval_tokens: int = 0  # tokens the periodic validation passes forward (step 0 and every eval_steps)


# The train stage's fixed cost on a CPU besides the steps: imports, model load, tokenisation, saving (measured on
# the bundled model: 10-20 s).
STAGE_FIXED_SECONDS = 15.0


def stage_seconds(plan: Plan, target: Target, estimate: Estimate) -> float | None:
    """The whole train stage: the steps, the validation forwards (2P FLOPs a token) and the fixed cost."""
    if estimate.run_seconds is None:
        return None
    forward_share = 2 / 6 if estimate.method in ("full", "distill") else 2 / 4  # forward of a 6P / 4P step
    eval_seconds = plan.eval_tokens / estimate.tokens_per_s * forward_share
    return estimate.run_seconds + eval_seconds + (STAGE_FIXED_SECONDS if target.device == "cpu" else 30.0)


def _rows(path) -> int:
    try:
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


def _run_tokens(cfg: ProjectConfig, run: RunShape, model_dir) -> tuple[str, float | None]:
    """Sets run.total_tokens from the data when it exists; returns the note for the header and tokens per row."""
    train_file = cfg.layout.train_file
    tokens = count_tokens_in_split(train_file, model_dir, run.seq_len)
    rows = _rows(train_file)
    per_row = tokens / rows if tokens and rows else None
    max_steps = cfg.train.max_steps
    if max_steps:
        row_tokens = per_row or run.seq_len
        run.total_tokens = int(max_steps * run.batch_size * run.grad_accum * row_tokens)
        return f"{max_steps} steps x {run.batch_size * run.grad_accum} rows x ~{row_tokens:.0f} tokens", per_row
    if tokens is not None:
        run.total_tokens = int(tokens * cfg.train.epochs)
        return f"{tokens:,} tokens in {train_file} x {cfg.train.epochs} epochs", per_row
    return f"no {train_file} yet: run `domaintune data` first for run times", per_row


def _eval_tokens(cfg: ProjectConfig, run: RunShape, per_row: float | None) -> int:
    if not run.total_tokens or per_row is None:
        return 0
    train = cfg.train
    steps = train.max_steps or run.total_tokens / (per_row * run.batch_size * run.grad_accum)
    rows = _rows(cfg.layout.val_file)
    rows = min(rows or train.max_val_samples or 0, train.max_val_samples or rows)
    return int((steps // train.eval_steps + 1) * rows * per_row)


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
    tokens_note, per_row = _run_tokens(cfg, run, model_dir)

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
        "Memory = weights + gradients + AdamW states + activations + logits + runtime; train stage = run time + "
        "validation forwards + loading/saving; "
        "time = FLOPs per token (6P full, 4P frozen base, +2P checkpointing) / usable FLOP/s. "
        "Estimates, not measurements: leave ~10% headroom."
    )
    return Plan(header, targets, footer, _eval_tokens(cfg, run, per_row))
