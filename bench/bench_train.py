"""Training throughput: domaintune LoRA vs LLaMA-Factory 0.9.5, same model, same tokens, same settings, same run.

Settings (every run): bundled SmolLM2-135M-Instruct (its converted safetensors folder), LoRA r=8 alpha=16
dropout 0.05 on all linear layers, max length 256, batch 4, no accumulation, lr 2e-4 cosine, no warmup,
seed 42, logging every step, STEPS*4 Chinese medical Q&A rows = exactly one epoch, ChatML with the same
system prompt, loss on the answer tokens and the <|im_end|> after them.

Identical tokens: most CSV rows are longer than 256 tokens with this tokenizer, and the two tools truncate
differently (LLaMA-Factory cuts prompt and answer proportionally, domaintune keeps the prompt and cuts the
answer). So each answer that does not fit is shortened here, before either tool sees it, to the longest prefix
whose whole conversation fits in 256 tokens; neither tool truncates. LLaMA-Factory uses `chatml_turn_end`
(its chatml with the assistant slot ending at <|im_end|>, see lf_runner.py) so it neither feeds nor learns
the newline after the last <|im_end|> -- as domaintune. Every training step's batch is recorded on both
sides (bench/batch_trace.py: a hash of each example's token ids and labels) and the table says whether
each run trained on exactly the same examples in the same steps as the reference; the label-token and
token totals are printed per run, and so is the step-1 loss (computed before any update, so it checks
that the loss definitions agree: assistant-token mean cross-entropy).

Measured the same way for both (the same callback, batch_trace.step_clock, in both processes): tokens the
Trainer fed (num_input_tokens_seen: non-padding tokens; every token of a padding-free batch) / seconds
between on_step_begin and on_step_end (forward, backward, optimizer step; no evaluation, checkpointing,
loading or tokenisation). Both wall-clock and process-CPU seconds are reported: on a CPU shared with other
jobs the per-CPU-second ratio is the steadier one; on a quiet machine with --threads 1 they agree.

Runs (alternating tools, so a change in machine load hits both sides):
  domaintune bf16               precision bf16 with every default CPU lever (docs/train-performance.md): frozen base
                                held in bf16, cheap LoRA dropout masks, fused LoRA linear node, domaintune_cpu
                                attention, label-token fused head + cross-entropy, malloc buffers kept; padded batches
  LLaMA-Factory bf16            bf16 + use_cpu, its defaults otherwise -- including gradient checkpointing
  LLaMA-Factory bf16 no-GC      the same with disable_gradient_checkpointing (domaintune's default is off):
                                identical settings, the like-for-like comparison
  domaintune fp32 / LLaMA-Factory fp32   fp32 padded (LLaMA-Factory's CPU default, with its checkpointing)
  domaintune bf16 padding-free  train.packing: true, measured as a lever (on these near-256-token rows it
                                is slower: CPU attention works on the whole flattened row under a block mask)
  --ablations                   domaintune bf16 again with one lever off at a time (LEVERS), each in a fresh
                                process, to show what each contributes
Same dropout rate on both sides (0.05 on every LoRA input, one independent mask per module); domaintune draws its
masks from 16 random bits per element (train/speed/fast_dropout.py: same law to within 1e-5), so it drops other elements
than torch's bernoulli_ does and losses after step 1 differ by dropout noise. Step-1 losses are unaffected (LoRA B
starts at zero, so the masked branch adds nothing yet) and still check that both compute the same loss. Levers measured and not kept:
torch.compile (inductor, CPU) did not finish compiling the first step in 15 minutes on the 2-core machine.

LLaMA-Factory runs in its own venv (default /work/lf-venv: torch==2.13.0 installed first, then
llamafactory==0.9.5, torchvision/torchaudio removed; its audio import is satisfied by bench/lf_shim).

Usage: python bench/bench_train.py --steps 10 --lf-bf16 [--ablations] [--threads 1] [--lf-python PATH] [--skip-lf]
       [--skip-packing] [--only "domaintune bf16,LLaMA-Factory bf16 no-GC"] [--json] [--precision auto|fp32|bf16]
       [--force-bf16] [--device cpu|cuda]
       python bench/bench_train.py --check-estimate examples/medical-zh.yaml RUN_DIR [--set train.precision=fp32]

Precision: the runs in the precision `precision: auto` picks here come first (it is printed, with the CPU's model
and flags); bf16 runs only where the CPU does bf16 natively (--force-bf16 runs it emulated). --precision picks the
precision of the --ablations runs.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSV_PATH = Path(os.environ.get("DOMAINTUNE_SHARED_DATASETS", REPO.parent / "shared" / "datasets")) / (
    "zh_medical_dialogue/internal_medicine_sample.csv"
)
SYSTEM = "你是一名专业的内科医生，请用简洁、准确的中文回答患者的问题。"
BATCH, MAX_LEN, LR, SEED = 4, 256, 2e-4, 42
MIN_ANSWER_CHARS = 16


def load_rows(n: int) -> tuple[list[dict], dict]:
    """The first n usable CSV rows, each fitting in MAX_LEN tokens so that neither tool truncates anything.

    Most rows are longer than 256 tokens (median ~490 with this tokenizer), and the two tools truncate
    differently (LLaMA-Factory cuts prompt and answer proportionally, domaintune keeps the prompt and cuts
    the answer). So an answer that does not fit is shortened here, to the longest character prefix whose whole
    ChatML conversation (system + user + assistant + <|im_end|>) is at most MAX_LEN tokens; both tools then
    get the same text and feed the same token ids. Rows whose question leaves < MIN_ANSWER_CHARS are skipped.
    """
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import load_tokenizer
    from domaintune.train.dataset import encode_messages

    if not CSV_PATH.is_file():
        sys.exit(f"bench needs the shared datasets: {CSV_PATH} not found")
    tokenizer = load_tokenizer(ModelConfig())

    def length(question, answer):
        return len(encode_messages(tokenizer, messages(question, answer), max_length=10**9)[0])

    rows, stats = [], {"whole": 0, "answer_shortened": 0, "skipped_long_question": 0}
    with CSV_PATH.open(encoding="gb18030", newline="") as handle:
        for rec in csv.DictReader(handle):
            question = "\n".join(x.strip() for x in (rec["title"], rec["ask"]) if x and x.strip())
            answer = (rec["answer"] or "").strip()
            if not (question and answer):
                continue
            if length(question, answer) <= MAX_LEN:
                stats["whole"] += 1
            elif length(question, answer[:MIN_ANSWER_CHARS]) > MAX_LEN:
                stats["skipped_long_question"] += 1
                continue
            else:
                lo, hi = MIN_ANSWER_CHARS, len(answer)  # lo fits, hi does not
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if length(question, answer[:mid]) <= MAX_LEN else (lo, mid)
                answer = answer[:lo].rstrip()
                stats["answer_shortened"] += 1
            rows.append({"question": question, "answer": answer, "tokens": length(question, answer)})
            if len(rows) >= n:
                break
    if len(rows) < n:
        sys.exit(f"only {len(rows)} usable rows in {CSV_PATH}; ask for fewer --steps")
    return rows, stats


def messages(question: str, answer: str) -> list[dict]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]


def write_domaintune_data(rows, run_dir: Path) -> None:
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)

    def line(r):
        return json.dumps({"messages": messages(r["question"], r["answer"])}, ensure_ascii=False) + "\n"

    (data / "train.jsonl").write_text("".join(line(r) for r in rows), "utf-8")
    (data / "val.jsonl").write_text("".join(line(r) for r in rows[:8]), "utf-8")


def train_section(steps: int, precision: str, packing: bool, threads: int, extra: dict | None) -> dict:
    train = {
        "method": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "max_length": MAX_LEN,
        "batch_size": BATCH,
        "learning_rate": LR,
        "warmup_ratio": 0.0,
        "lr_scheduler": "cosine",
        "max_steps": steps,
        "eval_steps": steps,
        "save_steps": steps,
        "logging_steps": 1,
        "max_val_samples": 8,
        "precision": precision,
        "packing": packing,
        "num_threads": threads,
        "tracking": "none",
    }
    for key, value in (extra or {}).items():
        train[key] = {**train.get(key, {}), **value} if isinstance(value, dict) else value
    return train


# domaintune's CPU levers, each switched off alone by --ablations (in a fresh process, since the malloc
# setting cannot be undone inside one): name -> train-section override.
LEVERS = {
    "cheap dropout mask": {"speed": {"cheap_mask_dropout": False}},
    "fused LoRA linear": {"speed": {"fused_lora_linear": False}},
    "domaintune_cpu attention": {"speed": {"attention": "sdpa"}},
    "label-token head": {"speed": {"fused_head_loss": False}},
    "kept malloc buffers": {"speed": {"keep_freed_buffers": False}},
}


TRACE: list[dict] = []  # per-step batch records of the current in-process run (bench/batch_trace.py)


def run_domaintune(
    rows, steps: int, workdir: Path, precision: str, packing: bool, threads: int, extra: dict | None = None
) -> dict:
    from domaintune.config import config_from_dict
    from domaintune.layout import RunLayout
    from domaintune.train.runner import run_train

    run_dir = workdir / f"dt-{precision}-{'packed' if packing else 'padded'}-{len(list(workdir.iterdir()))}"
    write_domaintune_data(rows, run_dir)
    cfg = config_from_dict(
        {
            "name": "bench",
            "seed": SEED,
            "model": {"name_or_path": "smollm2-135m-instruct"},
            "train": train_section(steps, precision, packing, threads, extra),
        }
    )
    import batch_trace

    TRACE.clear()
    clock = batch_trace.step_clock()
    m = run_train(cfg, RunLayout(run_dir), extra_callbacks=[clock])
    gc.collect()
    figures = clock.figures()
    assert figures["tokens"] == m["tokens_this_session"], (figures, m["tokens_this_session"])
    return {
        **figures,
        "runner_tokens_per_second": m["tokens_per_second"],
        "final_logged_loss": m["final_train_loss"],
        "mean_train_loss": m["mean_train_loss"],
        "steps": m["steps"],
        "truncated": m["truncated"],
        "train_curve": m["train_curve"],
        "batches": list(TRACE),
    }


def run_llamafactory(
    rows,
    steps: int,
    workdir: Path,
    lf_python: str,
    bf16: bool,
    threads: int,
    gradient_checkpointing: bool = True,
    device: str = "cpu",
) -> dict:
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    data_dir = workdir / "lf-data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "zhmed.json").write_text(
        json.dumps(
            [{"instruction": r["question"], "output": r["answer"], "system": SYSTEM} for r in rows], ensure_ascii=False
        ),
        "utf-8",
    )
    (data_dir / "dataset_info.json").write_text(
        json.dumps(
            {
                "zhmed": {
                    "file_name": "zhmed.json",
                    "columns": {"prompt": "instruction", "response": "output", "system": "system"},
                }
            }
        )
    )
    config = {
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "model_name_or_path": str(resolve_model_dir(ModelConfig())),
        "template": "chatml_turn_end",
        "dataset": "zhmed",
        "dataset_dir": str(data_dir),
        "cutoff_len": MAX_LEN,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target": "all",
        "per_device_train_batch_size": BATCH,
        "gradient_accumulation_steps": 1,
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.0,
        "max_steps": steps,
        "num_train_epochs": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": SEED,
        "output_dir": str(workdir / f"lf-out-{'bf16' if bf16 else 'fp32'}-{len(list(workdir.iterdir()))}"),
        "overwrite_output_dir": True,
        "bf16": bf16,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "overwrite_cache": True,
        "include_num_input_tokens_seen": "non_padding",
        "disable_tqdm": True,
        "use_cpu": device == "cpu",
        "disable_gradient_checkpointing": not gradient_checkpointing,
    }
    cfg_path, out_path = workdir / "lf-config.json", workdir / "lf-result.json"
    cfg_path.write_text(json.dumps(config))
    out_path.unlink(missing_ok=True)
    env = dict(
        os.environ, PYTHONPATH=str(REPO / "bench" / "lf_shim"), DISABLE_VERSION_CHECK="1", OMP_NUM_THREADS=str(threads)
    )
    proc = subprocess.run(
        [lf_python, str(REPO / "bench" / "lf_runner.py"), str(cfg_path), str(out_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"LLaMA-Factory run failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out_path.read_text())
    result["truncated"] = None
    return result


def auto_precision(device: str):
    """What `precision: auto` picks on this machine (with why), and whether bf16 is native here."""
    from domaintune.hardware.autoselect import choose_precision
    from domaintune.hardware.probe import detect_hardware

    hardware = detect_hardware()
    chosen = choose_precision("auto", device, hardware)
    return chosen, (chosen.value == "bf16" if device == "cuda" else hardware.cpu_bf16)


def machine_line(device: str) -> str:
    """CPU model name and its matmul-relevant flags (or the GPU), for docs/train-performance.md."""
    from domaintune.hardware.probe import detect_hardware

    hardware = detect_hardware()
    flags = sorted(f for f in hardware.cpu_flags if f.startswith(("avx512", "amx", "avx2", "fma", "avx_vnni")))
    line = f"{hardware.cpu_model}, {hardware.cpu_cores} CPU(s), flags {' '.join(flags) or 'none of avx2/avx512/amx'}"
    if device == "cuda":
        import torch

        line += f"; GPU {torch.cuda.get_device_name(0)}"
    return line


def check_estimate(
    config: Path, run_dir: Path, sets: list[str], cpu_gflops: float | None = None, decode_step_s: float | None = None
) -> bool:
    """`domaintune estimate`'s train-stage prediction (peak memory, wall time) against a measured train stage.

    The run folder must hold the data stage's output. When it holds a finished train stage with the GNU time
    record (time.txt, from `/usr/bin/time -v`) that one is used; else the stage runs here under measurement
    (peak RSS of the child, wall clock). Prints both and whether each is within 25%; returns that.
    `cpu_gflops` / `decode_step_s`: figures measured on an idle machine, used instead of this CPU's probes (the
    line then says so); the load average is printed beside every check.
    """
    import re
    import resource
    import time

    from domaintune.config import load_config
    from domaintune.hardware.plan import plan_estimates, stage_seconds

    cfg = load_config(config, sets, run_dir)
    time_txt, metrics_path = run_dir / "time.txt", run_dir / "train" / "metrics.json"
    if not (time_txt.is_file() and metrics_path.is_file()):
        sets_args = [a for s in sets for a in ("--set", s)]
        cmd = [sys.executable, "-m", "domaintune", "train", str(config), "--output-dir", str(run_dir), *sets_args]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
        time_txt.write_text(
            f"Elapsed (wall clock) time (s): {wall}\nMaximum resident set size (kbytes): {int(peak_gib * 1024**2)}\n"
        )
    text = time_txt.read_text()
    peak_gib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024**2
    measured_wall = json.loads(metrics_path.read_text())["wall_seconds"] if metrics_path.is_file() else None
    load = os.getloadavg()
    cpu_flops = cpu_gflops * 1e9 if cpu_gflops else None
    plan = plan_estimates(cfg, gpus=[], cpu_flops=cpu_flops, decode_step_seconds=decode_step_s)
    target = plan.targets[0]
    estimate = next(e for e in target.estimates if e.method == cfg.train.trained_as)
    predicted_wall = stage_seconds(plan, target, estimate)
    rows = [("peak memory GiB", estimate.total_gib, peak_gib), ("train stage s", predicted_wall, measured_wall)]
    given = " (given, not probed)"
    print(f"estimate vs measured, {config} train stage on {target.name}:")
    print(
        f"  load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; matmul {target.peak_tflops * 1e3:.0f} GFLOP/s"
        f"{given if cpu_flops else ''}, decode step {target.decode_step_seconds:.3f} s{given if decode_step_s else ''}"
        f", {plan.decode_steps} decode steps; predicted steps {estimate.run_seconds or 0:.0f} s at "
        f"{estimate.tokens_per_s:.0f} tok/s"
    )
    if plan.load_note and not (cpu_flops and decode_step_s):  # with both figures given, nothing was probed
        print(f"  WARNING: {plan.load_note}")
    ok = True
    for what, predicted, measured in rows:
        if predicted is None or not measured:
            print(f"  {what:16s} predicted {predicted}, measured {measured}: cannot compare")
            ok = False
            continue
        ratio = predicted / measured
        within = abs(ratio - 1) <= 0.25
        ok &= within
        print(
            f"  {what:16s} predicted {predicted:8.2f} measured {measured:8.2f} ratio {ratio:4.2f} "
            f"{'within 25%' if within else 'OFF by more than 25%'}"
        )
    return ok


def same_batches(a: dict, b: dict) -> str:
    """'identical' when both runs trained on the same examples (token ids and labels) in the same steps."""
    if not a.get("batches") or not b.get("batches"):
        return "not recorded"
    if [x["examples"] for x in a["batches"]] == [x["examples"] for x in b["batches"]]:
        return "identical"
    sa = sorted(e for x in a["batches"] for e in x["examples"])
    sb = sorted(e for x in b["batches"] for e in x["examples"])
    return "same examples, different order" if sa == sb else "DIFFERENT examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for every run (1 is fastest on a CPU shared with other jobs)",
    )
    parser.add_argument("--lf-python", default="/work/lf-venv/bin/python")
    parser.add_argument("--skip-lf", action="store_true")
    parser.add_argument("--lf-bf16", action="store_true", help="also run LLaMA-Factory with bf16")
    parser.add_argument("--skip-packing", action="store_true", help="skip the domaintune padding-free run")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated run names to keep, e.g. 'domaintune bf16,LLaMA-Factory bf16 no-GC'",
    )
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    parser.add_argument(
        "--ablations",
        action="store_true",
        help="also run 'domaintune bf16' once with each CPU lever off (each in its own process)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="precision of the ablation runs and of the headline ratio (auto: what `precision: auto` picks here)",
    )
    parser.add_argument(
        "--force-bf16", action="store_true", help="also run bf16 on a CPU without native bf16 (emulated: slow)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU proof's run")
    parser.add_argument(
        "--check-estimate",
        nargs=2,
        metavar=("CONFIG", "RUN_DIR"),
        default=None,
        help="compare `domaintune estimate`'s train-stage memory and time with a measured run of CONFIG in RUN_DIR",
    )
    parser.add_argument("--set", action="append", default=[], help="with --check-estimate: config overrides")
    parser.add_argument(
        "--cpu-gflops", type=float, default=None, help="with --check-estimate: matmul GFLOP/s measured when idle"
    )
    parser.add_argument(
        "--decode-step-s", type=float, default=None, help="with --check-estimate: decode step seconds measured idle"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON: {extra, out} for an ablation run
    args = parser.parse_args()
    if args.check_estimate:
        config, run_dir = (Path(p) for p in args.check_estimate)
        sys.exit(0 if check_estimate(config, run_dir, args.set, args.cpu_gflops, args.decode_step_s) else 1)

    import torch
    from transformers import Trainer

    sys.path.insert(0, str(REPO / "bench"))
    import batch_trace

    batch_trace.install(Trainer, TRACE)
    torch.set_num_threads(args.threads)
    rows, selection = load_rows(args.steps * BATCH)
    chosen, native_bf16 = auto_precision(args.device)
    ablation_precision = chosen.value if args.precision == "auto" else args.precision
    if args.child:  # one ablation run, in this fresh process
        child = json.loads(args.child)
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            result = run_domaintune(
                rows, args.steps, Path(tmp), child["precision"], False, args.threads, child["extra"]
            )
        Path(child["out"]).write_text(json.dumps(result, default=str))
        return
    print(f"machine: {machine_line(args.device)}")
    print(f"precision auto here: {chosen.value} ({chosen.reason})")
    bf16_runs = native_bf16 or args.force_bf16
    ours_bf16, ours_packed, ours_fp32 = ("domaintune bf16", "domaintune bf16 padding-free", "domaintune fp32")
    ours_fast = f"domaintune {ablation_precision}"  # the reference run: the precision auto picks (or --precision)
    lf_fp32, lf_bf16, lf_bf16_nogc = ("LLaMA-Factory fp32", "LLaMA-Factory bf16", "LLaMA-Factory bf16 no-GC")
    lf_fp32_nogc = "LLaMA-Factory fp32 no-GC"
    results: dict[str, dict] = {}
    lf_errors = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)

        def ours(precision, packing):
            return lambda: run_domaintune(rows, args.steps, workdir, precision, packing, args.threads)

        def lf(bf16, gc=True):
            return lambda: run_llamafactory(
                rows, args.steps, workdir, args.lf_python, bf16, args.threads, gc, args.device
            )

        def ablation(lever):
            def run():
                out = workdir / f"ablation-{len(list(workdir.iterdir()))}.json"
                child = json.dumps({"extra": LEVERS[lever], "out": str(out), "precision": ablation_precision})
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--steps",
                        str(args.steps),
                        "--threads",
                        str(args.threads),
                        "--child",
                        child,
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                return json.loads(out.read_text())

            return run

        # Alternate the tools so that a change in machine load hits both sides alike; the precision auto picks
        # first (it is the reference run); bf16 only where the CPU does it natively (or --force-bf16).
        plan = []
        for precision in sorted(("fp32", "bf16"), key=lambda p: p != ablation_precision):
            if precision == "bf16" and bf16_runs:
                plan.append((ours_bf16, ours("bf16", False)))
                if not args.skip_lf and args.lf_bf16:
                    plan += [(lf_bf16, lf(True)), (lf_bf16_nogc, lf(True, gc=False))]
            elif precision == "fp32":
                plan.append((ours_fp32, ours("fp32", False)))
                if not args.skip_lf:
                    plan += [(lf_fp32, lf(False)), (lf_fp32_nogc, lf(False, gc=False))]
        if not args.skip_packing and bf16_runs:
            plan.append((ours_packed, ours("bf16", True)))
        if args.only:
            keep = {name.strip() for name in args.only.split(",")}
            unknown = keep - {name for name, _ in plan}
            if unknown:
                sys.exit(f"--only: unknown run(s) {sorted(unknown)}; runs: {[name for name, _ in plan]}")
            plan = [(name, run) for name, run in plan if name in keep]
        if args.ablations:
            plan += [(f"{ours_fast} - {lever}", ablation(lever)) for lever in LEVERS]
        for name, run in plan:
            try:
                results[name] = run()
            except (RuntimeError, FileNotFoundError) as exc:
                if not name.startswith("LLaMA"):
                    raise
                lf_errors[name] = str(exc)

    lengths = [r["tokens"] for r in rows]
    print(
        f"\nLoRA r=8 all-linear (dropout 0.05), SmolLM2-135M-Instruct, max_len {MAX_LEN}, batch {BATCH}, "
        f"{args.steps} steps = one epoch over {len(rows)} zh medical rows, torch {torch.__version__}, "
        f"{args.threads} thread(s)"
    )
    print(
        f"rows: {selection['whole']} whole, {selection['answer_shortened']} with the answer shortened to fit "
        f"{MAX_LEN} tokens ({selection['skipped_long_question']} skipped: question too long); "
        f"{min(lengths)}-{max(lengths)} tokens, mean {sum(lengths) / len(lengths):.0f}: neither tool truncates"
    )
    lf_versions = next((r["versions"] for r in results.values() if "versions" in r), None)
    if lf_versions:
        print(
            f"LLaMA-Factory {lf_versions['llamafactory']} (transformers {lf_versions['transformers']}) in its own venv; "
            "GC = gradient checkpointing (LLaMA-Factory's default; domaintune's default is off)"
        )
    print(
        f"{'run':44s} {'GC':>3s} {'tokens':>7s} {'labels':>7s} {'step s':>7s} {'tok/s':>7s} {'tok/cpu-s':>9s} "
        f"{'step-1 loss':>11s} {'mean loss':>9s} {'final loss':>10s}  batches vs {ours_fast}"
    )
    reference = results[next(iter(results))]
    for name, r in results.items():
        label_tokens = sum(b["label_tokens"] for b in r["batches"])
        first = r["train_curve"][0][1] if r["train_curve"] else float("nan")
        gc_flag = "yes" if r.get("gradient_checkpointing") else "no"
        print(
            f"{name:44s} {gc_flag:>3s} {r['tokens']:7d} {label_tokens:7d} {r['step_seconds']:7.1f} "
            f"{r['tokens_per_second']:7.1f} {r['tokens_per_cpu_second']:9.1f} {first:11.4f} {r['mean_train_loss']:9.4f} {r['final_logged_loss']:10.4f}  "
            f"{'(reference)' if r is reference else same_batches(reference, r)}"
        )
    for lever in LEVERS:
        name = f"{ours_fast} - {lever}"
        if name in results and ours_fast in results:
            a, b = results[ours_fast], results[name]
            print(
                f"{a['tokens_per_second'] / b['tokens_per_second']:5.2f}x tokens/s from {lever} "
                f"({ours_fast} / the same with it off; mean loss {a['mean_train_loss']:.4f} vs "
                f"{b['mean_train_loss']:.4f})"
            )
    pairs = [
        (ours_bf16, lf_bf16_nogc, "bf16 vs bf16, identical settings"),
        (ours_bf16, lf_bf16, "bf16 vs bf16, LLaMA-Factory's default gradient checkpointing"),
        (ours_bf16, lf_fp32, "ours bf16 vs LLaMA-Factory's CPU default"),
        (ours_fp32, lf_fp32_nogc, "fp32 vs fp32, identical settings"),
        (ours_fp32, lf_fp32, "fp32 vs fp32, LLaMA-Factory's default gradient checkpointing"),
        (ours_packed, ours_bf16, "padding-free vs padded batches"),
    ]
    for ours_name, theirs, what in pairs:
        if ours_name in results and theirs in results:
            a, b = results[ours_name], results[theirs]
            print(
                f"{a['tokens_per_second'] / b['tokens_per_second']:5.2f}x tokens/s "
                f"({a['tokens_per_cpu_second'] / b['tokens_per_cpu_second']:.2f}x per CPU-second)  "
                f"{ours_name} / {theirs} ({what}); "
                f"mean loss {a['mean_train_loss']:.4f} vs {b['mean_train_loss']:.4f}, "
                f"final {a['final_logged_loss']:.4f} vs {b['final_logged_loss']:.4f}"
            )
    if not bf16_runs:
        print(f"bf16: not measured (no native bf16 on this CPU: {chosen.reason}; --force-bf16 to run it emulated)")
    if args.skip_lf:
        print("LLaMA-Factory: not measured (--skip-lf)")
    for name, error in lf_errors.items():
        print(f"{name}: not measured: {error}")
    if args.json:
        for r in results.values():
            r.pop("batches", None)
        print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
