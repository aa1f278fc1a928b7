"""`run_export`: merge the trained adapter, quantise, write GGUF + Modelfile, and a checksummed manifest.

Everything is built in a staging folder inside the run folder and swapped into `export/` at the
end, so an interrupted export never leaves a half-written `export/` (or a manifest that lies).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from domaintune.config import ProjectConfig
from domaintune.errors import UserError
from domaintune.export import measure
from domaintune.utils.io import read_jsonl, sha256_file, write_json
from domaintune.utils.process import pid_alive

log = logging.getLogger(__name__)
console = Console(stderr=True)

# Mixed scripts, digits, emoji, whitespace runs and special tokens: where tokenizer conversions go wrong.
TOKENIZER_PROBE = " naïve café 123 4567 🚀 \n\n  \t 头痛发热 <|im_end|> <|endoftext|> it's 'RE"

METRIC_DESCRIPTION = (
    "answer-token perplexity of the reference answers on the first {rows} rows of data/val.jsonl "
    "(export stage's own measure, identical for every artefact; lower is better)"
)


def _say(message: str) -> None:
    console.log(message, highlight=False, markup=False)


def _val_rows(output_dir: Path, limit: int) -> tuple[list[dict], str | None]:
    path = output_dir / "data" / "val.jsonl"
    if not path.is_file():
        return [], f"{path} not found (run `domaintune data` first): metrics are not measured"
    rows = []
    for row in read_jsonl(path):
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows, None


def _test_rows(output_dir: Path, limit: int) -> tuple[list[dict], str | None]:
    if limit == 0:
        return [], "export.eval_items is 0"
    path = output_dir / "data" / "test.jsonl"
    if not path.is_file():
        return [], f"{path} not found: answer quality is not measured"
    rows = []
    for row in read_jsonl(path):
        messages = row.get("messages") or []
        if len(messages) >= 2 and messages[-1].get("role") == "assistant":
            rows.append(row)
        if len(rows) >= limit:
            break
    return rows, None


def _probe_sequences(tokenizer, examples) -> list[list[int]]:
    if examples:
        return [ids for ids, _ in examples[:3]]
    text = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "头痛发热三天，应该怎么办？ What should I do about a headache?"},
            {"role": "assistant", "content": "请多休息，多喝水，如持续发热请就医。Rest and drink water."},
        ],
        tokenize=False,
    )
    return [tokenizer(text, add_special_tokens=False)["input_ids"]]


def _speed_prompts(rows: list[dict], count: int) -> list[list[dict]]:
    prompts = [r["messages"][:-1] for r in rows if len(r.get("messages") or []) >= 2][:count]
    if not prompts:
        prompts = [[{"role": "user", "content": "头痛发热三天，应该怎么办？"}]][:count]
    return prompts


def _quality(name: str, model, tokenizer, quality_rows, cfg) -> dict | None:
    if not quality_rows:
        return None
    from domaintune.export.measure import answer_quality

    _say(f"[{name}] answering {len(quality_rows)} test prompts (scored with eval's {cfg.eval.primary_metric})")
    return answer_quality(model, tokenizer, quality_rows, cfg.eval.primary_metric, cfg.export.eval_max_new_tokens)


def _measure(name: str, model, tokenizer, examples, prompts, ctx: dict, path: Path, load_s: float | None) -> dict:
    ecfg = ctx["cfg"].export
    entry: dict[str, Any] = {"path": path.name, "bytes": measure.folder_size(path)}
    if load_s is not None:
        entry["load_s"] = round(load_s, 3)
    _say(f"[{name}] timing generation ({len(prompts)} prompts x {ecfg.speed_new_tokens} tokens)")
    entry["speed"] = measure.generation_speed(model, tokenizer, prompts, ecfg.speed_new_tokens)
    if examples:
        _say(f"[{name}] perplexity on {len(examples)} val rows")
        entry["metric"] = measure.perplexity(model, examples)
    quality = _quality(name, model, tokenizer, ctx["quality_rows"], ctx["cfg"])
    if quality is not None:
        entry["quality"] = quality
    return entry


def _with_deltas(artifacts: dict[str, dict], reference: str) -> None:
    ref = artifacts[reference]
    for name, entry in artifacts.items():
        entry["size_ratio_vs_merged"] = round(entry["bytes"] / ref["bytes"], 4)
        if "speed" in entry:
            entry["speed_ratio_vs_merged"] = round(entry["speed"]["tokens_per_s"] / ref["speed"]["tokens_per_s"], 4)
        if "metric" in entry and "metric" in ref:
            entry["perplexity_delta_vs_merged"] = entry["metric"]["perplexity"] - ref["metric"]["perplexity"]
        if "quality" in entry and "quality" in ref:
            entry["quality_delta_vs_merged"] = entry["quality"]["mean"] - ref["quality"]["mean"]


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("domaintune", "torch", "transformers", "peft", "safetensors", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def file_checksums(folder: Path, skip: set[str] = frozenset()) -> list[dict]:
    files = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if rel in skip:
            continue
        files.append({"path": rel, "sha256": sha256_file(file), "bytes": file.stat().st_size})
    return files


def verify_manifest(export_dir: str | Path) -> list[str]:
    """Files in `export_dir` whose sha256 differs from its manifest (empty: all intact)."""
    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text(encoding="utf-8"))
    problems = []
    for item in manifest["files"]:
        path = export_dir / item["path"]
        if not path.is_file():
            problems.append(f"{item['path']}: missing")
        elif sha256_file(path) != item["sha256"]:
            problems.append(f"{item['path']}: sha256 mismatch")
    return problems


def run_export(cfg: ProjectConfig, output_dir: str | Path) -> dict:
    """Export `<output_dir>/model` into `<output_dir>/export/`; returns the manifest (also written there)."""
    output_dir = Path(output_dir)
    model_dir = output_dir / "model"
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} does not exist: run `domaintune train` first (export reads the trained model)")
    _remove_stale_staging(output_dir)
    staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=f".export-staging-{os.getpid()}-"))
    try:
        manifest = _build(cfg, output_dir, model_dir, staging)
        manifest["files"] = file_checksums(staging)
        write_json(staging / "manifest.json", manifest)
        _swap_into_place(staging, output_dir / "export")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _remove_stale_staging(output_dir: Path) -> None:
    """Staging folders of exports that were killed (their process is gone) are deleted."""
    for folder in output_dir.glob(".export-staging-*"):
        parts = folder.name.split("-")
        pid = int(parts[2]) if len(parts) > 3 and parts[2].isdigit() else None
        if pid is None or not pid_alive(pid):
            log.info("removing %s left by an interrupted export", folder)
            shutil.rmtree(folder, ignore_errors=True)


def _swap_into_place(staging: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".export-old-{os.getpid()}-{int(time.time())}")
        os.rename(target, old)
    os.rename(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build(cfg: ProjectConfig, output_dir: Path, model_dir: Path, staging: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from domaintune.export.gguf_export import ollama_modelfile, write_gguf
    from domaintune.export.quantize import load_int8, save_bitsandbytes, save_int8
    from domaintune.model.loader import (
        apply_chat_template_setting,
        end_of_turn_token_ids,
        is_adapter_dir,
        load_trained,
        torch_dtype,
    )

    ecfg = cfg.export
    started = time.perf_counter()
    if ecfg.num_threads:
        torch.set_num_threads(ecfg.num_threads)
    rows, metric_skip = _val_rows(output_dir, ecfg.eval_rows)
    if metric_skip:
        console.print(f"[yellow]warning:[/] {metric_skip}")

    # ---- merge
    adapter = is_adapter_dir(model_dir)
    _say(f"loading {'adapter + base' if adapter else 'full model'} from {model_dir}")
    model, tokenizer = load_trained(model_dir, dtype="float32", merge=False)
    apply_chat_template_setting(tokenizer, cfg.model.chat_template, source=str(model_dir))
    examples = measure.eval_examples(tokenizer, rows, ecfg.eval_max_length)
    quality_rows, quality_skip = _test_rows(output_dir, ecfg.eval_items)
    if quality_rows:
        try:
            import domaintune.eval.metrics  # noqa: F401 - the eval stage's scorers
        except ImportError as exc:
            quality_rows, quality_skip = [], f"the eval stage's metrics cannot be imported ({exc})"
    if quality_skip and ecfg.eval_items:
        console.print(f"[yellow]warning:[/] {quality_skip}")
    ctx = {"cfg": cfg, "quality_rows": quality_rows}
    probes = _probe_sequences(tokenizer, examples)
    prompts = _speed_prompts(rows, ecfg.speed_prompts)
    merge_check: dict[str, Any] = {"adapter": adapter}
    if adapter:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            raise UserError(f"{model_dir}: adapter_config.json present but the folder did not load as a PEFT adapter")
        with torch.inference_mode():
            unmerged = [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in probes]
        model = model.merge_and_unload()
        with torch.inference_mode():
            merged_logits = [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in probes]
        diff = max(float((a - b).abs().max()) for a, b in zip(unmerged, merged_logits))
        merge_check.update({"max_abs_logit_diff": diff, "tolerance": ecfg.merge_tolerance})
        if diff > ecfg.merge_tolerance:
            raise RuntimeError(f"merged model differs from base+adapter by {diff:.3g} > {ecfg.merge_tolerance}")
        _say(f"merged adapter into base: max |logit diff| {diff:.2e}")
        del unmerged, merged_logits
    merged_dir = staging / "merged"
    model = model.to(torch_dtype(ecfg.merged_dtype))
    model.generation_config.eos_token_id = end_of_turn_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    del model
    gc.collect()

    reference, load_s = measure.timed(lambda: AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    reference.eval()
    artifacts: dict[str, dict] = {}
    artifacts["merged"] = _measure("merged", reference, tokenizer, examples, prompts, ctx, merged_dir, load_s)
    artifacts["merged"]["dtype"] = ecfg.merged_dtype

    # ---- dynamic INT8 (CPU)
    if ecfg.int8:
        _say("[int8] dynamic INT8 quantisation of Linear layers")
        int8_dir = save_int8(copy.deepcopy(reference), tokenizer, staging / "int8", exclude=ecfg.int8_exclude)
        (int8_model, int8_tok), load_s = measure.timed(lambda: load_int8(int8_dir))
        artifacts["int8"] = _measure("int8", int8_model, int8_tok, examples, prompts, ctx, int8_dir, load_s)
        artifacts["int8"]["logits_vs_merged"] = measure.compare_logits(reference, int8_model, probes)
        artifacts["int8"]["loader"] = "domaintune.export.quantize.load_int8"
        int8_spec = json.loads((int8_dir / "quantization.json").read_text(encoding="utf-8"))
        artifacts["int8"]["layers"] = {"quantized": len(int8_spec["quantized"]), "kept_float": int8_spec["kept_float"]}
        del int8_model
        gc.collect()

    # ---- bitsandbytes (GPU)
    for kind in ecfg.bitsandbytes:
        bits = int(kind[0])
        folder = save_bitsandbytes(merged_dir, staging / f"bnb-{kind}", bits)
        artifacts[f"bnb-{kind}"] = {"path": folder.name, "bytes": measure.folder_size(folder)}

    # ---- magnitude pruning
    if ecfg.prune_sparsity is not None:
        from domaintune.export.prune import magnitude_prune

        _say(f"[pruned] magnitude pruning to {ecfg.prune_sparsity:.0%} sparsity")
        pruned = copy.deepcopy(reference)
        stats = magnitude_prune(pruned, ecfg.prune_sparsity)
        pruned_dir = staging / "pruned"
        pruned.save_pretrained(pruned_dir, safe_serialization=True)
        tokenizer.save_pretrained(pruned_dir)
        artifacts["pruned"] = _measure("pruned", pruned, tokenizer, examples, prompts, ctx, pruned_dir, None)
        artifacts["pruned"]["sparsity"] = stats
        del pruned
        gc.collect()

    # ---- GGUF + Modelfile
    gguf_dir = staging / "gguf"
    for qtype in ecfg.gguf:
        file_name = f"{cfg.name}-{qtype}.gguf"
        _say(f"[gguf-{qtype}] writing {file_name}")
        info = write_gguf(merged_dir, gguf_dir / file_name, qtype, tokenizer_pre=ecfg.gguf_tokenizer_pre, name=cfg.name)
        entry: dict[str, Any] = {
            "path": f"gguf/{file_name}",
            "bytes": (gguf_dir / file_name).stat().st_size,
            "tokenizer_pre": info["tokenizer_pre"],
            "tensors": info["tensors"],
        }
        if ecfg.verify_gguf:
            entry.update(_verify_gguf(gguf_dir, file_name, qtype, reference, tokenizer, probes, prompts, examples, ctx))
        artifacts[f"gguf-{qtype}"] = entry
    if ecfg.gguf and ecfg.modelfile:
        target = ecfg.modelfile_gguf if ecfg.modelfile_gguf in ecfg.gguf else ecfg.gguf[0]
        stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_token_ids(tokenizer)]
        if "<|im_start|>" in (tokenizer.chat_template or "") and "<|im_start|>" not in stops:
            stops.append("<|im_start|>")
        text = ollama_modelfile(
            f"{cfg.name}-{target}.gguf",
            tokenizer,
            stops,
            ecfg.ollama_template,
            ecfg.ollama_parameters,
            system=getattr(cfg.data, "system_prompt", None),
        )
        (gguf_dir / "Modelfile").write_text(text, encoding="utf-8")

    _with_deltas(artifacts, "merged")
    source_files = [{"path": p["path"], "sha256": p["sha256"]} for p in file_checksums(model_dir)]
    return {
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "project": cfg.name,
        "source": {
            "model_dir": str(model_dir),
            "adapter": adapter,
            "files": source_files,
            "base_model": cfg.model.name_or_path,
        },
        "merge": merge_check,
        "metric": {
            "name": "perplexity",
            "description": METRIC_DESCRIPTION.format(rows=len(examples)) if examples else None,
            "skipped": metric_skip,
        },
        "quality": {
            "metric": cfg.eval.primary_metric,
            "scorer": "domaintune.eval.metrics.score_item",
            "description": (
                f"greedy answers to the first {len(quality_rows)} rows of data/test.jsonl "
                f"(max {ecfg.eval_max_new_tokens} new tokens), scored with the eval stage's "
                f"{cfg.eval.primary_metric} (x100; higher is better)"
            )
            if quality_rows
            else None,
            "skipped": quality_skip,
        },
        "artifacts": artifacts,
        "config": ecfg.model_dump(mode="json"),
        "libraries": _library_versions(),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def check_gguf_tolerance(file_name: str, qtype: str, logits: dict, tolerances: dict[str, float]) -> float | None:
    """Fail the export when a GGUF file's logits stray further from the merged model than allowed."""
    tolerance = tolerances.get(qtype)
    if tolerance is not None and logits["relative_error"] > tolerance:
        raise RuntimeError(
            f"{file_name}: relative logit error {logits['relative_error']:.3g} exceeds export.gguf_tolerance.{qtype}"
            f" = {tolerance}"
        )
    return tolerance


def _verify_gguf(gguf_dir, file_name, qtype, reference, tokenizer, probes, prompts, examples, ctx) -> dict:
    """Load the GGUF file back through transformers and compare it with the merged model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ecfg = ctx["cfg"].export
    _say(f"[gguf-{qtype}] loading back with transformers (gguf_file=) to verify")
    loaded, load_s = measure.timed(
        lambda: AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=file_name, dtype=torch.float32)
    )
    loaded.eval()
    gguf_tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=file_name)
    sample = tokenizer.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True) + TOKENIZER_PROBE
    same_ids = (
        tokenizer(sample, add_special_tokens=False)["input_ids"]
        == gguf_tok(sample, add_special_tokens=False)["input_ids"]
    )
    if not same_ids:
        raise RuntimeError(f"{file_name}: the tokenizer stored in the GGUF file encodes text differently")
    if (gguf_tok.chat_template or "") != (tokenizer.chat_template or ""):
        raise RuntimeError(f"{file_name}: the chat template stored in the GGUF file differs from the source")
    logits = measure.compare_logits(reference, loaded, probes)
    tolerance = check_gguf_tolerance(file_name, qtype, logits, ecfg.gguf_tolerance)
    ref_tokens = measure.greedy_tokens(reference, tokenizer, prompts[0], ecfg.speed_new_tokens)
    got_tokens = measure.greedy_tokens(loaded, tokenizer, prompts[0], ecfg.speed_new_tokens)
    prefix = 0
    for a, b in zip(ref_tokens, got_tokens):
        if a != b:
            break
        prefix += 1
    entry = {
        "load_s": round(load_s, 3),
        "verified": {
            "tokenizer_identical": True,
            "chat_template_identical": True,
            "logits_vs_merged": logits,
            "tolerance": tolerance,
            "greedy_identical": ref_tokens == got_tokens,
            "greedy_common_prefix": prefix,
            "greedy_tokens": len(ref_tokens),
        },
    }
    entry["speed"] = measure.generation_speed(loaded, tokenizer, prompts, ecfg.speed_new_tokens)
    if examples:
        entry["metric"] = measure.perplexity(loaded, examples)
    quality = _quality(f"gguf-{qtype}", loaded, tokenizer, ctx["quality_rows"], ctx["cfg"])
    if quality is not None:
        entry["quality"] = quality
    del loaded
    gc.collect()
    return entry
