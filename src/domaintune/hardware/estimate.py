"""`domaintune estimate`: memory and time of each training method, before downloading or training.

Memory follows the usual accounting (weights + gradients + AdamW states + activations +
logits + runtime overhead; activations per Korthikanti et al. 2022, attention scores left out
because SDPA/flash kernels do not store them). Time is FLOPs / achievable FLOP/s: 6·P per token
for full training, 4·P when weights are frozen (no weight gradients), +2·P with gradient
checkpointing. Achievable FLOP/s on this CPU is measured with a short matmul; named GPUs use
their datasheet dense bf16/fp16 peak times a model-FLOPs utilisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3

# Datasheet dense 16-bit tensor peak (TFLOP/s) and memory (GiB).
NAMED_GPUS: dict[str, tuple[float, float]] = {
    "A100-80G": (312.0, 80.0),
    "A100-40G": (312.0, 40.0),
    "H100-80G": (989.0, 80.0),
    "H200-141G": (989.0, 141.0),
    "L4-24G": (121.0, 24.0),
    "RTX 4090-24G": (165.0, 24.0),
    "RTX 3090-24G": (71.0, 24.0),
    "T4-16G": (65.0, 16.0),
    "V100-32G": (125.0, 32.0),
}
GPU_MFU = {"full": 0.40, "adapter": 0.30}  # typical HF Trainer utilisation on one GPU
# Share of the measured matmul FLOP/s that a training step reaches on a CPU, by precision.
# Calibrated on this project's runs (LoRA r=8 all-linear, SmolLM2-135M, 1 thread of a Xeon with
# AMX; first 147 fp32 / 161 bf16 tok/s = 0.43 of a 184 GFLOP/s fp32 matmul / 0.07 of a 1.2 TFLOP/s
# AMX matmul), rescaled to bench/bench_train.py with the CPU levers of docs/train-performance.md:
# fp32 172.8 tok/s (0.50), bf16 314.5 tok/s (0.14). With AMX the matmuls are not the bottleneck;
# the element-wise work, attention and random masks are.
CPU_EFFICIENCY = {"fp32": 0.50, "bf16": 0.14}
# python, torch, tokenizer, data and the fp32 copy made while loading (CPU; the real LoRA run peaked
# at 4.3 GB against 2.2 GiB of tensors) / CUDA context (GPU)
RUNTIME_OVERHEAD_GIB = {"cpu": 2.0, "gpu": 1.0}

ADAPTER_METHODS = {"lora", "dora", "qlora", "prefix", "prompt", "ptuning", "ia3"}
METHODS = ["full", "freeze", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "ptuning", "distill", "dpo"]


@dataclass
class ModelShape:
    params: int
    hidden: int
    layers: int
    vocab: int
    heads: int
    linear_shapes: dict[str, list[tuple[int, int]]]  # module suffix -> [(in, out)] for every layer
    embedding_params: int


@dataclass
class RunShape:
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    lora_r: int = 8
    freeze_trainable_layers: int = 2
    gradient_checkpointing: bool = False
    precision: str = "bf16"  # fp32 | bf16 | fp16
    num_virtual_tokens: int = 20
    total_tokens: int | None = None  # tokens the whole run processes (rows x avg len x epochs)
    steps: int | None = None  # optimizer steps of the whole run
    padding: float = 1.0  # tokens computed / tokens trained on (rows padded to the batch's longest; see padding_factor)


@dataclass
class Estimate:
    method: str
    trainable_params: int
    memory_gib: dict[str, float]
    tokens_per_s: float
    run_seconds: float | None

    @property
    def total_gib(self) -> float:
        return sum(self.memory_gib.values())


def model_shape_from_config(config_path: str | Path) -> ModelShape:
    """Count parameters from config.json alone, on the meta device: nothing is downloaded or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    linear_shapes: dict[str, list[tuple[int, int]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            linear_shapes.setdefault(name.rsplit(".", 1)[-1], []).append((module.in_features, module.out_features))
    embedding = model.get_input_embeddings().weight.numel()
    return ModelShape(
        params=params,
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        heads=config.num_attention_heads,
        linear_shapes=linear_shapes,
        embedding_params=embedding,
    )


def trainable_params(method: str, shape: ModelShape, run: RunShape) -> int:
    if method in ("full", "distill"):
        return shape.params
    if method == "freeze":
        per_layer = (shape.params - shape.embedding_params) / shape.layers
        return int(per_layer * min(run.freeze_trainable_layers, shape.layers))
    all_linear = [io for shapes in shape.linear_shapes.values() for io in shapes]
    if method in ("lora", "qlora", "dpo"):
        return sum(run.lora_r * (i + o) for i, o in all_linear)
    if method == "dora":
        return sum(run.lora_r * (i + o) + o for i, o in all_linear)
    if method == "ia3":
        keys = [k for k in shape.linear_shapes if k in ("k_proj", "v_proj", "down_proj")]
        return sum(o if k != "down_proj" else i for k in keys for i, o in shape.linear_shapes[k])
    if method == "prefix":
        return 2 * shape.layers * run.num_virtual_tokens * shape.hidden
    if method in ("prompt", "ptuning"):
        # p-tuning adds a small MLP encoder on top of the virtual token embeddings
        return run.num_virtual_tokens * shape.hidden + (2 * shape.hidden * shape.hidden if method == "ptuning" else 0)
    raise ValueError(f"unknown method {method}")


def memory_breakdown(method: str, shape: ModelShape, run: RunShape, device: str) -> dict[str, float]:
    half = run.precision in ("bf16", "fp16")
    act_bytes = 2 if half else 4
    p_train = trainable_params(method, shape, run)
    # Weights: full/freeze keep fp32 master weights under autocast; frozen adapter bases load in 16 bit;
    # QLoRA stores NF4 (0.5 byte) + double-quantised absmax (~0.06 byte) and keeps embeddings in 16 bit.
    weights: float
    if method in ("full", "freeze", "distill"):
        weights = shape.params * 4
    elif method == "qlora":
        weights = (shape.params - shape.embedding_params) * 0.56 + shape.embedding_params * 2
    else:
        weights = shape.params * (2 if half else 4)
    gradients = p_train * 4
    optimizer = p_train * 8  # AdamW: two fp32 moments
    tokens = run.seq_len * run.batch_size
    if run.gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * act_bytes + tokens * 34 * shape.hidden * act_bytes / 2
    else:
        activations = shape.layers * tokens * 34 * shape.hidden * act_bytes / 2
    logits = tokens * shape.vocab * 4 * 2  # fp32 logits and their gradient
    extra = 0.0
    if method == "distill":
        extra = shape.params * (2 if half else 4) + logits / 2  # teacher weights (same size by default) + its logits
    if method == "dpo":
        activations *= 2  # chosen and rejected sequences
        logits *= 2
    return {
        "weights": weights / GIB,
        "gradients": gradients / GIB,
        "optimizer": optimizer / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
        "teacher/reference": extra / GIB,
        "runtime": RUNTIME_OVERHEAD_GIB[device],
    }


def flops_per_token(method: str, shape: ModelShape, run: RunShape) -> float:
    p = shape.params
    per_token: float = 6 * p if method in ("full", "distill") else 4 * p
    if method == "freeze":
        per_token = 4 * p + 2 * trainable_params(method, shape, run)
    if run.gradient_checkpointing:
        per_token += 2 * p
    if method == "distill":
        per_token += 2 * p  # teacher forward
    if method == "dpo":
        per_token = 2 * per_token + 2 * 2 * p  # chosen+rejected, plus reference forwards
    if method == "qlora":
        per_token *= 1.3  # dequantisation on every matmul
    return per_token


def measure_cpu_flops(precision: str = "fp32", seconds: float = 0.6, repeats: int = 5) -> float:
    """Achievable matmul FLOP/s on this CPU in the given precision, with torch's current thread count (set it to the
    run's first): the best of `repeats` short bursts, so that a moment of load from another process costs one burst,
    not the figure. A machine busy for the whole probe still reads low (see `machine_load_note`)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 1024
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        iterations, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / repeats:
            torch.mm(a, b)
            iterations += 1
        best = max(best, 2 * n**3 * iterations / (time.perf_counter() - start))
    return best


def machine_load_note(usable_cores: int, threads: int) -> str | None:
    """A warning when other processes keep the cores busy: the 1-minute load average above the cores the run leaves
    free (usable cores - its threads, + 0.5 for this process and noise). The time estimate assumes an idle machine."""
    import os

    load = os.getloadavg()[0]
    if load <= max(usable_cores - threads, 0) + 0.5:
        return None
    return (
        f"the machine looks busy (load average {load:.2f} on {usable_cores} usable core(s), the run takes {threads}): "
        "the FLOP/s and decode probes read low and the run will be slower; times assume an idle machine"
    )


# Decode probe: the model is built from its config.json with random weights (nothing downloaded) and greedy decode
# steps are timed in transformers' `generate`, as `train.generation_eval` runs it. A model up to this many weight
# bytes is probed whole (weights streamed from memory at every step, as in the real run); a larger one with 1 and 3
# of its layers, extrapolated linearly to all of them (cache-resident weights: a lower bound).
DECODE_PROBE_WHOLE_MODEL_BYTES = 2 * GIB
# GPU decode is bound by kernel launches in eager `generate` for small batches: ~20 launches per decoder layer at
# ~10-20 us each. An assumption (no GPU was measured for this estimate), used for the named GPUs only.
GPU_DECODE_SECONDS_PER_LAYER = 0.4e-3


def measure_decode_step_seconds(
    config_path: str | Path,
    *,
    batch: int,
    precision: str = "fp32",
    lora_r: int | None = None,
    prompt_tokens: int = 64,
    repetition_penalty: float = 1.0,
) -> float:
    """Seconds of one greedy decode step (one new token for each of `batch` sequences) on this CPU, measured.

    With `lora_r` the model carries unmerged LoRA adapters on every linear layer (peft), as the model being
    trained does during the generation eval. The median of 11 consecutive decode steps (prefill excluded). Uses
    torch's current thread count (set it to the run's first). A few seconds on an idle CPU for a ~100M model
    (14 decode steps plus building the model)."""
    import copy

    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_path)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    layers = config.num_hidden_layers
    whole = model_shape_from_config(config_path).params * dtype.itemsize <= DECODE_PROBE_WHOLE_MODEL_BYTES
    depths = (layers,) if whole else (1, 3)
    seconds = {}
    for depth in depths:
        small = copy.deepcopy(config)
        small.num_hidden_layers = depth
        if getattr(small, "layer_types", None):
            small.layer_types = list(small.layer_types)[:depth]
        seconds[depth] = _time_decode(small, dtype, batch, prompt_tokens, lora_r, repetition_penalty)
    if whole:
        return seconds[layers]
    per_layer = max((seconds[3] - seconds[1]) / 2, 0.0)
    return max(seconds[1] - per_layer, 0.0) + per_layer * layers


def _time_decode(config, dtype, batch: int, prompt_tokens: int, lora_r: int | None, repetition_penalty: float) -> float:
    """Median seconds between consecutive decode steps of one `generate` call (a logits processor stamps every step:
    the first stamp follows the prefill, so the intervals are decode steps only; the median shrugs off a stall)."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            self.stamps.append(time.perf_counter())
            return scores

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear"))
    model.eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt_tokens))

    def run(new_tokens: int) -> list[float]:
        clock = StepClock()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            repetition_penalty=repetition_penalty,
            pad_token_id=0,
            use_cache=True,
            logits_processor=LogitsProcessorList([clock]),
        )
        return [later - earlier for earlier, later in zip(clock.stamps, clock.stamps[1:])]

    with torch.inference_mode():
        run(2)  # warm-up
        return statistics.median(run(12))


def estimate_all(
    shape: ModelShape,
    run: RunShape,
    device: str,
    peak_flops: float,
    methods: list[str] | None = None,
) -> list[Estimate]:
    results = []
    for method in methods or METHODS:
        if device == "gpu":
            efficiency = GPU_MFU["full" if method in ("full", "distill", "freeze") else "adapter"]
        else:
            efficiency = CPU_EFFICIENCY["bf16" if run.precision == "bf16" else "fp32"]
        tokens_per_s = peak_flops * efficiency / (flops_per_token(method, shape, run) * run.padding)
        seconds = run.total_tokens / tokens_per_s if run.total_tokens else None
        results.append(
            Estimate(
                method,
                trainable_params(method, shape, run),
                memory_breakdown(method, shape, run, device),
                tokens_per_s,
                seconds,
            )
        )
    return results


def row_token_lengths(path: Path, tokenizer_dir: Path | None, max_length: int) -> list[float] | None:
    """Tokens of each row of a messages JSONL (capped at max_length); None when the split is absent."""
    from domaintune.utils.io import read_jsonl

    if not path.is_file():
        return None
    texts = ["\n".join(m.get("content", "") for m in row.get("messages", [])) for row in read_jsonl(path)]
    if not texts:
        return []
    # Characters per token of the model's tokenizer on this very data (sampled), not a guess.
    chars_per_token = 3.0
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        sample = texts[:200]
        sample_tokens = sum(len(ids) for ids in tokenizer(sample)["input_ids"])
        chars_per_token = sum(len(t) for t in sample) / max(sample_tokens, 1)
    return [min(len(text) / chars_per_token + 20, max_length) for text in texts]  # +20: chat-template tokens


def count_tokens_in_split(path: Path, tokenizer_dir: Path | None, max_length: int) -> int | None:
    """Tokens in a messages JSONL (each row capped at max_length); None when the split is absent."""
    lengths = row_token_lengths(path, tokenizer_dir, max_length)
    return None if lengths is None else int(sum(lengths))


def padding_factor(lengths: list[float], batch_size: int) -> float:
    """Tokens a step computes over the tokens it trains on when each batch is padded to its longest row: the
    expected longest of `batch_size` rows drawn at random (with replacement, order statistics of `lengths`) over
    the mean row. 1.0 for one row per batch or equal lengths."""
    if not lengths or batch_size <= 1:
        return 1.0
    ordered, n = sorted(lengths), len(lengths)
    expected_max = sum(x * (((i + 1) / n) ** batch_size - (i / n) ** batch_size) for i, x in enumerate(ordered))
    return expected_max / (sum(ordered) / n)
