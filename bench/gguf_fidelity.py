"""How faithful each GGUF type is to the merged model, by the three measures export's verification uses.

Takes a finished run's export (`<run>/export/merged` and `<run>/export/gguf/<name>-f16.gguf`), quantises the
f16 file to each asked type with llama.cpp's quantiser (in a temporary folder), and verifies every file on the
same val rows export uses: teacher-forced top-1 agreement, perplexity change and free-running greedy agreement,
each against its default bound (`domaintune.llamacpp.verify.TOLERANCE`). The baseline is the f16 file, measured
in the same run.

    python bench/gguf_fidelity.py examples/runs/medical-zh --types f16 q8_0 q5_k_m q4_k_m --json fidelity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="A run folder with export/merged and export/gguf/*-f16.gguf.")
    parser.add_argument("--types", nargs="+", default=["f16", "q8_0", "q5_k_m", "q4_k_m"])
    parser.add_argument("--rows", type=int, default=32, help="Val rows (export's eval_rows default).")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Greedy tokens per prompt.")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from domaintune.llamacpp.quantize import quantize
    from domaintune.llamacpp.verify import HFReference, verify_gguf

    merged = args.run / "export" / "merged"
    f16 = next((args.run / "export" / "gguf").glob("*-f16.gguf"), None)
    if not merged.is_dir() or f16 is None:
        sys.exit(f"{args.run}: needs export/merged and export/gguf/*-f16.gguf (run `domaintune export` first)")
    rows = [json.loads(line) for line in (args.run / "data" / "val.jsonl").open(encoding="utf-8")][: args.rows]
    conversations = [r["messages"][:-1] for r in rows]
    references = [r["messages"][-1]["content"] for r in rows]
    shared = HFReference(merged)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for qtype in args.types:
            path = f16 if qtype == "f16" else quantize(f16, Path(tmp) / f"{qtype}.gguf", qtype)
            started = time.perf_counter()
            v = verify_gguf(
                path, merged, qtype, conversations, references, max_new_tokens=args.max_new_tokens, reference=shared
            ).as_dict()
            v.pop("template")
            v["seconds"] = round(time.perf_counter() - started, 1)
            v["bytes"] = path.stat().st_size
            results[qtype] = v
            print(
                f"{qtype:7} top-1 {v['top1_agreement']:.4f} (>= {v['tolerance']['min_top1_agreement']})  "
                f"ppl change {v['perplexity_change']:.4f} (<= {v['tolerance']['max_perplexity_change']})  "
                f"greedy {v['greedy_agreement']:.3f} (>= {v['tolerance']['min_agreement']}), "
                f"identical {v['greedy_exact']:.2f}  {'ok' if v['ok'] else 'FAILS: ' + '; '.join(v['problems'])}",
                flush=True,
            )
    out = {"cpu": cpu_model(), "run": str(args.run), "rows": len(rows), "results": results}
    if "f16" in results:
        base = results["f16"]
        out["vs_f16"] = {
            q: {
                "top1_disagreement_ratio": round((1 - r["top1_agreement"]) / max(1e-9, 1 - base["top1_agreement"]), 2),
                "size_ratio": round(r["bytes"] / base["bytes"], 3),
            }
            for q, r in results.items()
        }
        print("vs f16:", json.dumps(out["vs_f16"]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
