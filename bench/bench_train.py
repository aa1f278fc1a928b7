"""Training throughput: domaintune LoRA vs LLaMA-Factory 0.9.5, same model, data and settings, same run.

Settings (both): bundled SmolLM2-135M-Instruct (the converted safetensors folder), LoRA r=8 alpha=16
dropout 0.05 on all linear layers, max length 256, batch 4, no accumulation, lr 2e-4 cosine, no warmup,
seed 42, the same STEPS*4 Chinese medical Q&A rows (one epoch, so both see the same examples), ChatML
with the same system prompt, loss on the answer tokens.

Measured the same way for both: non-padding tokens the Trainer fed the model / seconds inside optimizer
steps (evaluation, checkpointing, model loading and tokenisation excluded).

domaintune is run twice: with its levers (bf16 autocast on AVX-512-BF16/AMX CPUs with the frozen base held
in bf16, padding-free batches), and like-for-like (fp32, padded batches: LLaMA-Factory's defaults). Both
use domaintune's loss that projects onto the vocabulary only the positions that predict a label
(`train/sft_trainer.py`): with assistant-only labels most positions are prompt. LLaMA-Factory runs in
fp32 (its CPU default) and, with --lf-bf16, in bf16 too (use_cpu + bf16 autocast, like ours).
Note: at max length 256 most rows are truncated; LLaMA-Factory cuts prompt and answer proportionally,
domaintune keeps the prompt and cuts the answer, so the two losses are over different answer tokens.
LLaMA-Factory runs in its own venv (default /work/lf-venv: torch==2.13.0 installed first, then
llamafactory==0.9.5, torchvision/torchaudio removed; its audio import is satisfied by bench/lf_shim).

Usage: python bench/bench_train.py [--steps 12] [--threads 1] [--lf-python /work/lf-venv/bin/python] [--skip-lf]
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


def load_rows(n: int) -> list[dict]:
    if not CSV_PATH.is_file():
        sys.exit(f"bench needs the shared datasets: {CSV_PATH} not found")
    rows = []
    with CSV_PATH.open(encoding="gb18030", newline="") as handle:
        for rec in csv.DictReader(handle):
            question = "\n".join(x.strip() for x in (rec["title"], rec["ask"]) if x and x.strip())
            answer = (rec["answer"] or "").strip()
            if question and answer:
                rows.append({"question": question, "answer": answer})
            if len(rows) >= n:
                break
    return rows


def write_domaintune_data(rows, run_dir: Path) -> None:
    data = run_dir / "data"
    data.mkdir(parents=True, exist_ok=True)

    def msg(r):
        return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["question"]},
                             {"role": "assistant", "content": r["answer"]}]}

    (data / "train.jsonl").write_text("".join(json.dumps(msg(r), ensure_ascii=False) + "\n" for r in rows), "utf-8")
    (data / "val.jsonl").write_text("".join(json.dumps(msg(r), ensure_ascii=False) + "\n" for r in rows[:8]), "utf-8")


def run_domaintune(rows, steps: int, workdir: Path, precision: str, packing: bool, threads: int) -> dict:
    from domaintune.config import config_from_dict
    from domaintune.train.runner import run_train

    run_dir = workdir / f"dt-{precision}-{'packed' if packing else 'padded'}"
    write_domaintune_data(rows, run_dir)
    cfg = config_from_dict({
        "name": "bench", "seed": SEED, "model": {"name_or_path": "smollm2-135m-instruct"},
        "train": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
                  "max_length": MAX_LEN, "batch_size": BATCH, "learning_rate": LR, "warmup_ratio": 0.0,
                  "lr_scheduler": "cosine", "max_steps": steps, "eval_steps": steps, "save_steps": steps,
                  "logging_steps": 5, "max_val_samples": 8, "precision": precision, "packing": packing,
                  "num_threads": threads,
                  "tracking": "none"},
    })
    m = run_train(cfg, run_dir)
    gc.collect()
    return {"tokens": m["tokens_this_session"], "step_seconds": m["train_step_seconds"],
            "tokens_per_second": m["tokens_per_second"], "final_logged_loss": m["final_train_loss"],
            "mean_train_loss": m["mean_train_loss"], "steps": m["steps"], "truncated": m["truncated"]}


def run_llamafactory(rows, steps: int, workdir: Path, lf_python: str, bf16: bool, threads: int) -> dict:
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    data_dir = workdir / "lf-data"
    data_dir.mkdir(exist_ok=True)
    (data_dir / "zhmed.json").write_text(json.dumps(
        [{"instruction": r["question"], "output": r["answer"], "system": SYSTEM} for r in rows], ensure_ascii=False),
        "utf-8")
    (data_dir / "dataset_info.json").write_text(json.dumps({"zhmed": {
        "file_name": "zhmed.json", "columns": {"prompt": "instruction", "response": "output", "system": "system"}}}))
    config = {
        "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "model_name_or_path": str(resolve_model_dir(ModelConfig())),
        "template": "chatml", "dataset": "zhmed", "dataset_dir": str(data_dir), "cutoff_len": MAX_LEN,
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lora_target": "all",
        "per_device_train_batch_size": BATCH, "gradient_accumulation_steps": 1, "learning_rate": LR,
        "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "max_steps": steps, "num_train_epochs": 1.0,
        "logging_steps": 5, "save_strategy": "no", "report_to": "none", "seed": SEED,
        "output_dir": str(workdir / f"lf-out-{'bf16' if bf16 else 'fp32'}"), "overwrite_output_dir": True,
        "bf16": bf16, "preprocessing_num_workers": 1, "dataloader_num_workers": 0, "overwrite_cache": True,
        "include_num_input_tokens_seen": "non_padding", "disable_tqdm": True, "use_cpu": True,
    }
    cfg_path, out_path = workdir / "lf-config.json", workdir / "lf-result.json"
    cfg_path.write_text(json.dumps(config))
    env = dict(os.environ, PYTHONPATH=str(REPO / "bench" / "lf_shim"), DISABLE_VERSION_CHECK="1",
               OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([lf_python, str(REPO / "bench" / "lf_runner.py"), str(cfg_path), str(out_path)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out_path.is_file():
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"LLaMA-Factory run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every run (1 is fastest on a CPU shared with other jobs)")
    parser.add_argument("--lf-python", default="/work/lf-venv/bin/python")
    parser.add_argument("--skip-lf", action="store_true")
    parser.add_argument("--lf-bf16", action="store_true", help="also run LLaMA-Factory with bf16")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rows = load_rows(args.steps * BATCH)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        results["domaintune bf16 padding-free"] = run_domaintune(rows, args.steps, workdir, "bf16", True, args.threads)
        results["domaintune fp32 padded"] = run_domaintune(rows, args.steps, workdir, "fp32", False, args.threads)
        lf_errors = {}
        if not args.skip_lf:
            for bf16 in (False, True) if args.lf_bf16 else (False,):
                name = f"LLaMA-Factory 0.9.5 {'bf16' if bf16 else 'fp32'}"
                try:
                    results[name] = run_llamafactory(rows, args.steps, workdir, args.lf_python, bf16, args.threads)
                except (RuntimeError, FileNotFoundError) as exc:
                    lf_errors[name] = str(exc)

    print(f"\nLoRA r=8 all-linear, SmolLM2-135M, max_len {MAX_LEN}, batch {BATCH}, {args.steps} steps, "
          f"{len(rows)} zh medical rows, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'run':34s} {'tokens':>8s} {'step s':>8s} {'tok/s':>8s} {'last loss':>10s} {'mean loss':>10s}")
    for name, r in results.items():
        print(f"{name:34s} {r['tokens']:8d} {r['step_seconds']:8.1f} {r['tokens_per_second']:8.1f} "
              f"{r['final_logged_loss']:10.4f} {r['mean_train_loss']:10.4f}")
    baseline = results.get("LLaMA-Factory 0.9.5 fp32")
    if baseline:
        for name in ("domaintune bf16 padding-free", "domaintune fp32 padded"):
            ratio = results[name]["tokens_per_second"] / baseline["tokens_per_second"]
            print(f"ratio {name} / LLaMA-Factory fp32: {ratio:.2f}x tokens/s; "
                  f"mean loss {results[name]['mean_train_loss']:.4f} vs {baseline['mean_train_loss']:.4f}")
        if "LLaMA-Factory 0.9.5 bf16" in results:
            ratio = results["domaintune bf16 padding-free"]["tokens_per_second"] / results["LLaMA-Factory 0.9.5 bf16"]["tokens_per_second"]
            print(f"ratio domaintune bf16 padding-free / LLaMA-Factory bf16: {ratio:.2f}x tokens/s")
    elif args.skip_lf:
        print("LLaMA-Factory: not measured (--skip-lf)")
    for name, error in lf_errors.items():
        print(f"{name}: not measured: {error}")
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
