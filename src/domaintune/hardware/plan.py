"""Turns a project config into estimate targets: this machine plus any named GPUs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from domaintune.hardware.autoselect import AUTO, choose_precision, choose_threads, usable_physical_cores
from domaintune.hardware.estimate import (
    ADAPTER_METHODS,
    GPU_DECODE_SECONDS_PER_LAYER,
    METHODS,
    NAMED_GPUS,
    Estimate,
    RunShape,
    estimate_all,
    machine_load_note,
    measure_cpu_flops,
    measure_decode_step_seconds,
    model_shape_from_config,
    padding_factor,
    row_token_lengths,
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
    decode_step_seconds: float = 0.0  # one greedy decode step of train.generation_eval's batch (0 when it is off)

    def supported(self, method: str) -> bool:
        return self.device == "gpu" or method != "qlora"


@dataclass
class Plan:
    header: str
    targets: list[Target]
    footer: str
    eval_tokens: int = 0  # tokens the periodic validation passes forward (step 0, every eval_steps, the last step)
    # train.generation_eval: decode steps over the whole run (evaluations x batches x max_new_tokens, an upper bound:
    # a batch decodes until its longest answer stops) and the prompt tokens its prefills forward
    decode_steps: int = 0
    prefill_tokens: int = 0
    load_note: str | None = None  # set when the machine looked busy while measuring


# The train stage's fixed cost on a CPU besides the steps: imports, model load, tokenisation, saving (measured on
# the bundled model: 10-20 s).
STAGE_FIXED_SECONDS = 15.0


def stage_seconds(plan: Plan, target: Target, estimate: Estimate) -> float | None:
    """The whole train stage: the steps, the validation forwards (2P FLOPs a token), train.generation_eval (its
    prefills at forward speed, its decode steps at the target's measured or assumed decode-step time; not for dpo,
    whose val rows are pairs) and the fixed cost."""
    if estimate.run_seconds is None:
        return None
    forward_share = 2 / 6 if estimate.method in ("full", "distill") else 2 / 4  # forward of a 6P / 4P step
    eval_seconds = plan.eval_tokens / estimate.tokens_per_s * forward_share
    if estimate.method != "dpo":
        eval_seconds += plan.prefill_tokens / estimate.tokens_per_s * forward_share
        eval_seconds += plan.decode_steps * target.decode_step_seconds
    return estimate.run_seconds + eval_seconds + (STAGE_FIXED_SECONDS if target.device == "cpu" else 30.0)


def _rows(path) -> int:
    try:
        with open(path, encoding="utf-8") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


def _run_tokens(cfg: ProjectConfig, run: RunShape, model_dir) -> tuple[str, float | None]:
    """Sets run.total_tokens, run.steps and run.padding from the data when it exists; returns the note for the
    header and tokens per domain row."""
    train_file = cfg.layout.train_file
    lengths = row_token_lengths(train_file, model_dir, run.seq_len)
    rows = len(lengths or [])
    per_row = sum(lengths) / rows if lengths else None
    replay = _replay_lengths(cfg, rows, run, model_dir)
    if lengths and not cfg.train.packing:  # packing: padding-free batches
        run.padding = padding_factor(lengths + replay, run.batch_size)
    max_steps = cfg.train.max_steps
    if max_steps:
        row_tokens = per_row or run.seq_len
        run.total_tokens = int(max_steps * run.batch_size * run.grad_accum * row_tokens)
        run.steps = max_steps
        return f"{max_steps} steps x {run.batch_size * run.grad_accum} rows x ~{row_tokens:.0f} tokens", per_row
    if lengths is not None:
        tokens = int(sum(lengths))
        run.total_tokens = int((tokens + sum(replay)) * cfg.train.epochs)
        run.steps = int(-(-(rows + len(replay)) * cfg.train.epochs // (run.batch_size * run.grad_accum)))
        note = f" + {len(replay)} replay rows" if replay else ""
        return f"{tokens:,} tokens in {train_file}{note} x {cfg.train.epochs} epochs", per_row
    return f"no {train_file} yet: run `domaintune data` first for run times", per_row


def _replay_lengths(cfg: ProjectConfig, rows: int, run: RunShape, model_dir) -> list[float]:
    """train.replay: ratio x domain rows of general rows per epoch; their token lengths, drawn evenly from the
    general file."""
    from pathlib import Path

    replay = cfg.train.replay
    if not replay.ratio or not rows:
        return []
    path = Path(replay.path) if replay.path else cfg.layout.general_file
    general = row_token_lengths(path, model_dir, run.seq_len)
    extra = int(replay.ratio * rows)
    if not general or not extra:
        return []
    return [general[int(i * len(general) / extra) % len(general)] for i in range(extra)]


def _evaluations(cfg: ProjectConfig, run: RunShape, per_row: float | None) -> int:
    """Evaluations in the run: step 0, every eval_steps, and the last step (FinalEvalCallback) when off the grid."""
    if not run.steps or per_row is None:
        return 0
    steps, every = run.steps, cfg.train.eval_steps
    return 1 + steps // every + (1 if steps % every else 0)


def _eval_tokens(cfg: ProjectConfig, evaluations: int, per_row: float | None) -> int:
    if not evaluations or per_row is None:
        return 0
    train = cfg.train
    rows = _rows(cfg.layout.val_file)
    rows = min(rows or train.max_val_samples or 0, train.max_val_samples or rows)
    return int(evaluations * rows * per_row)


def _prompt_share(val_file, items: int) -> float:
    """Characters of the prompts (every message but the answer) over whole rows, on the first `items` val rows."""
    from domaintune.utils.io import read_jsonl

    prompt = whole = 0
    try:
        for index, row in enumerate(read_jsonl(val_file)):
            if index == items:
                break
            lengths = [len(str(m.get("content") or "")) for m in row.get("messages", [])]
            prompt += sum(lengths[:-1])
            whole += sum(lengths)
    except OSError:
        return 0.5
    return prompt / whole if whole else 0.5


def _generation_eval(cfg: ProjectConfig, evaluations: int, per_row: float | None) -> tuple[int, int]:
    """(decode steps, prefill tokens) of train.generation_eval over the run."""
    settings = cfg.train.generation_eval
    if not settings.items or not evaluations:
        return 0, 0
    batches = -(-settings.items // settings.batch_size)
    prompt_tokens = (per_row or cfg.train.max_length) * _prompt_share(cfg.layout.val_file, settings.items)
    return evaluations * batches * settings.max_new_tokens, int(evaluations * settings.items * prompt_tokens)


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


def _cpu_target(
    cfg: ProjectConfig, run: RunShape, model_dir, hardware, measured: tuple[float | None, float | None]
) -> tuple[Target, str | None]:
    """This CPU, measured with the run's thread count: matmul FLOP/s and, with train.generation_eval on, the decode
    step. `measured` = (FLOP/s, decode-step seconds) given instead of probing (bench/bench_train.py only)."""
    import torch

    chosen = choose_precision(run.precision, "cpu", hardware).value if run.precision == AUTO else run.precision
    precision = "bf16" if chosen == "bf16" and hardware.cpu_bf16 else "fp32"
    run.precision = precision  # bf16 without AVX-512-BF16/AMX runs at fp32 speed or worse
    threads = choose_threads(cfg.train.num_threads).value
    generation = cfg.train.generation_eval
    flops, decode = measured
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        note = machine_load_note(usable_physical_cores()[0], threads)
        flops = flops or measure_cpu_flops(precision)
        if decode is None and generation.items:
            lora_r = (
                cfg.train.lora.r
                if cfg.train.method in ADAPTER_METHODS - {"ia3", "prefix", "prompt", "ptuning"}
                else None
            )
            decode = measure_decode_step_seconds(
                model_dir,
                batch=min(generation.items, generation.batch_size),
                precision=precision,
                lora_r=lora_r,
                repetition_penalty=generation.repetition_penalty,
            )
    finally:
        torch.set_num_threads(previous)
    name = f"this machine: CPU, {threads} thread(s) ({precision})"
    return Target(name, "cpu", hardware.memory_gib, flops / 1e12, decode_step_seconds=decode or 0.0), note


def plan_estimates(
    cfg: ProjectConfig,
    gpus: list[str],
    *,
    cpu_flops: float | None = None,
    decode_step_seconds: float | None = None,
) -> Plan:
    """The estimate for this machine and the named GPUs. `cpu_flops` / `decode_step_seconds` replace this CPU's
    probes (bench/bench_train.py's check with figures measured on an idle machine; the CLI always probes)."""
    from domaintune.model.loader import resolve_model_dir

    model_dir = resolve_model_dir(cfg.model)  # a config.json is all we read from it
    shape = model_shape_from_config(model_dir)
    run = run_shape_from_config(cfg)
    tokens_note, per_row = _run_tokens(cfg, run, model_dir)

    hardware = detect_hardware()
    requested = run.precision
    targets: list[Target] = []
    load_note = None
    if hardware.cuda_devices:
        name, memory = hardware.cuda_devices[0]
        peak = next((tf for gpu, (tf, _) in NAMED_GPUS.items() if gpu.split("-")[0] in name), 100.0)
        targets.append(Target(f"this machine: {name}", "gpu", memory, peak))
    else:
        cpu, load_note = _cpu_target(cfg, run, model_dir, hardware, (cpu_flops, decode_step_seconds))
        targets.append(cpu)
    for gpu in gpus:
        peak, memory = NAMED_GPUS[gpu]
        targets.append(Target(gpu, "gpu", memory, peak))
    for target in targets:
        # `auto` on a GPU is bf16 (fp16 on old ones: the same memory and datasheet speed)
        gpu_precision = "bf16" if requested == AUTO else requested
        target_run = replace(run, precision=gpu_precision) if target.device == "gpu" else run
        target.estimates = estimate_all(shape, target_run, target.device, target.peak_tflops * 1e12, METHODS)
        if target.device == "gpu":
            target.decode_step_seconds = shape.layers * GPU_DECODE_SECONDS_PER_LAYER
    header = (
        f"model {cfg.model.name_or_path}: {shape.params / 1e6:.1f}M parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}; sequence {run.seq_len}, batch {run.batch_size} x accumulation {run.grad_accum}, "
        f"precision {run.precision}, gradient checkpointing {'on' if run.gradient_checkpointing else 'off'}\n"
        f"run size: {tokens_note}; padding to each batch's longest row: x{run.padding:.2f} tokens computed"
    )
    evaluations = _evaluations(cfg, run, per_row)
    decode_steps, prefill_tokens = _generation_eval(cfg, evaluations, per_row)
    if decode_steps:
        header += f"\ngeneration eval: {evaluations} evaluations x up to {decode_steps // evaluations} decode steps"
    footer = (
        "Memory = weights + gradients + AdamW states + activations + logits + runtime; train stage = run time + "
        "validation forwards + generation eval (decode steps timed on this CPU) + loading/saving; "
        "time = FLOPs per token (6P full, 4P frozen base, +2P checkpointing) / usable FLOP/s. "
        "Estimates, not measurements: leave ~10% headroom."
    )
    if load_note:
        footer += f"\nWARNING: {load_note}."
    eval_tokens = _eval_tokens(cfg, evaluations, per_row)
    return Plan(header, targets, footer, eval_tokens, decode_steps, prefill_tokens, load_note)
