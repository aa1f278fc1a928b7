"""llama.cpp against transformers on the same CPU, threads and prompts, in one run.

eval: the eval stage's transformers path (left-padded batches of `--batch-size`, greedy `generate`,
stop at the end-of-turn token) against llama.cpp's continuous batching (`Decoder`, same batch size, a
q8_0 GGUF of the same model) on the same chat prompts: generated tokens per second, and how much of
each greedy transformers answer llama.cpp reproduces (agreement; 1.0 = identical answers).

serve: `domaintune serve` with `engine: transformers` and with `engine: llamacpp`, 32 concurrent
clients (bench_serve.py's load loop), requests/s and p50/p95 latency.

    nice python bench/bench_llamacpp.py --items 64 --max-new-tokens 64 --threads 2 --json bench/llamacpp.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ZH_TEST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "zh_medical_dialogue"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except OSError:
        return platform.processor()


def chat_prompts(n: int, source: str = "general") -> list[list[dict]]:
    """`general`: the general seed tasks (bench_serve's prompts); `medical-zh`: the main job's kind of question
    (title + ask of the Chinese internal-medicine sample, its system prompt), the first n rows."""
    if source == "medical-zh":
        import csv

        system = "你是一名专业的内科医生，请用简洁、准确的中文回答患者的问题。"  # examples/medical-zh.yaml
        with (ZH_TEST / "internal_medicine_sample.csv").open(encoding="gb18030", newline="") as handle:
            rows = [r for _, r in zip(range(n), csv.DictReader(handle))]
        return [
            [{"role": "system", "content": system}, {"role": "user", "content": f"{r['title']}\n{r['ask']}"}]
            for r in rows
        ]
    from bench_serve import load_prompts

    return [[{"role": "user", "content": p}] for p in load_prompts(n)]


def bench_transformers(model_dir: Path, prompts, max_new: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from domaintune.model.loader import end_of_turn_token_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eot = end_of_turn_token_ids(tok)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=eot, pad_token_id=tok.pad_token_id)
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    # as the eval stage does: longest prompts first, so that similar lengths share a batch (less padding)
    lengths = [len(tok(t, add_special_tokens=False).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    answers: list[list[int]] = [[] for _ in texts]
    t0 = time.perf_counter()
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=config)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1] :].tolist()):
            cut = next((k for k, t in enumerate(row) if t in eot), None)
            answers[i] = row if cut is None else row[:cut]
    wall = time.perf_counter() - t0
    tokens = sum(len(a) for a in answers)
    return {"wall_s": round(wall, 2), "tokens": tokens, "tok_per_s": round(tokens / wall, 1), "answers": answers}


def bench_llamacpp(model_dir: Path, prompts, max_new: int, batch: int, threads: int | None, quant: str) -> dict:
    from transformers import AutoTokenizer

    from domaintune.llamacpp.cache import gguf_for
    from domaintune.llamacpp.generate import Decoder, Sampling, generate
    from domaintune.llamacpp.runtime import GGUFModel
    from domaintune.llamacpp.tuning import choose_flash_attention
    from domaintune.model.loader import end_of_turn_token_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [
        tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
        for p in prompts
    ]
    t_conv = time.perf_counter()
    path = gguf_for(model_dir, quant)
    conversion = time.perf_counter() - t_conv
    model = GGUFModel(path)
    # as the eval stage decodes: flash attention on or off as measured on this CPU for this workload
    flash = choose_flash_attention(model, batch, sum(map(len, ids)) // len(ids), max_new, threads)
    print(f"llama.cpp flash attention {'on' if flash.on else 'off'}: {flash.reason}", file=sys.stderr)
    decoder = Decoder(
        model,
        stop_ids=end_of_turn_token_ids(tok),
        n_seq=batch,
        seq_ctx=1024,
        threads=threads,
        flash_attention=flash.on,
    )
    generate(decoder, ids[:1], Sampling(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    seqs = generate(decoder, ids, Sampling(max_tokens=max_new))
    wall = time.perf_counter() - t0
    tokens = sum(len(s.tokens) for s in seqs)
    return {
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tok_per_s": round(tokens / wall, 1),
        "answers": [s.tokens for s in seqs],
        "gguf": str(path),
        "conversion_s": round(conversion, 1),
        "decode_calls": decoder.decodes,
        "flash_attention": flash.on,
        "flash_attention_reason": flash.reason,
    }


def bench_eval(args, model_dir: Path) -> dict:
    from domaintune.llamacpp.verify import agreement

    prompts = chat_prompts(args.items, args.prompts)
    cpp = bench_llamacpp(model_dir, prompts, args.max_new_tokens, args.batch_size, args.threads, args.quant)
    hf = bench_transformers(model_dir, prompts, args.max_new_tokens, args.batch_size)
    scores = [agreement(a, b) for a, b in zip(hf.pop("answers"), cpp.pop("answers"))]
    return {
        "items": len(prompts),
        "transformers": hf,
        "llamacpp": cpp,
        "speedup": round(cpp["tok_per_s"] / hf["tok_per_s"], 2),
        "greedy_agreement": round(sum(scores) / len(scores), 3),
        "identical_answers": sum(1 for s in scores if s == 1.0),
    }


def bench_serve(args) -> dict:
    from bench_serve import load_prompts, pct, run_server_load
    from domaintune.config import config_from_dict

    prompts = load_prompts(args.clients * args.requests_per_client)
    out = {}
    for engine in ("llamacpp", "transformers"):
        cfg = config_from_dict(
            {
                "name": "bench",
                "output_dir": tempfile.mkdtemp(prefix="bench_cpp_"),
                "model": {"name_or_path": args.model},
                "serve": {
                    "engine": engine,
                    "max_batch_size": 32,
                    "batch_wait_ms": 20,
                    "max_tokens_cap": args.serve_max_tokens,
                    "default_max_tokens": args.serve_max_tokens,
                    "key_hash_iterations": 1000,
                    "serve_trained": False,
                    "request_timeout_s": 3600,
                },
            }
        )
        r = run_server_load(cfg, prompts, args.clients, args.serve_max_tokens)
        lat = r["latencies"]
        out[engine] = {
            "ok": len(lat),
            "errors": len(r["errors"]),
            "wall_s": round(r["wall_s"], 2),
            "req_per_s": round(len(lat) / r["wall_s"], 3),
            "p50_s": round(pct(lat, 0.5), 2),
            "p95_s": round(pct(lat, 0.95), 2),
            "completion_tokens": r["completion_tokens"],
        }
    out["req_per_s_ratio"] = round(out["llamacpp"]["req_per_s"] / out["transformers"]["req_per_s"], 2)
    out["p95_ratio"] = round(out["llamacpp"]["p95_s"] / out["transformers"]["p95_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--prompts", choices=["general", "medical-zh"], default="general")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quant", default="q8_0")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and llama.cpp threads (default: physical cores)"
    )
    parser.add_argument("--skip-serve", action="store_true")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--serve-max-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from domaintune.llamacpp.runtime import default_threads
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    args.threads = args.threads or default_threads()
    torch.set_num_threads(args.threads)
    os.environ["DOMAINTUNE_LLAMACPP_THREADS"] = str(args.threads)
    model_dir = resolve_model_dir(ModelConfig(name_or_path=args.model))
    result: dict = {"cpu": cpu_model(), "threads": args.threads, "load_average_start": os.getloadavg()[0]}
    result["eval"] = bench_eval(args, model_dir)
    print(json.dumps(result["eval"], indent=1), file=sys.stderr)
    if not args.skip_serve:
        result["serve"] = bench_serve(args)
    result["load_average_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
