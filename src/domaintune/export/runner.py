"""`run_export`: merge the trained adapter, quantise, write GGUF + Modelfile, and a checksummed manifest.

GGUF files are built by llama.cpp itself (`domaintune.export.gguf`); what they need is checked before
anything is built, and a GGUF that fails is reported in the manifest while the other artefacts are kept.

Everything is built in a staging folder inside the run folder and swapped into `export/` at the
end, so an interrupted export never leaves a half-written `export/` (or a manifest that lies).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from domaintune.errors import UserError
from domaintune.export import measure
from domaintune.export.gguf import check_gguf_plan
from domaintune.hardware.autoselect import apply_threads
from domaintune.layout import RunLayout
from domaintune.model.adapters import unmergeable_note
from domaintune.utils.io import atomic_dir, read_jsonl, remove_stale_staging, sha256_file, write_json
from domaintune.utils.process import pid_alive
from domaintune.utils.versions import library_versions

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

log = logging.getLogger(__name__)
console = Console(stderr=True)

# Mixed scripts, digits, emoji, whitespace runs and special tokens: where tokenizer conversions go wrong.
TOKENIZER_PROBE = " naïve café 123 4567 🚀 \n\n  \t 头痛发热 <|im_end|> <|endoftext|> it's 'RE"

METRIC_DESCRIPTION = (
    "answer-token perplexity of the reference answers on the first {rows} rows of data/val.jsonl "
    "(export stage's own measure, identical for every artefact; lower is better)"
)
# The libraries whose versions shape the exported files.
EXPORT_LIBRARIES = ("domaintune", "torch", "transformers", "peft", "safetensors", "gguf", "llama-cpp-python")


def run_export(cfg: ProjectConfig, layout: RunLayout) -> dict:
    """Export the run's `model/` into its `export/`; returns the manifest (also written there)."""
    if not layout.model_dir.is_dir():
        raise UserError(
            f"{layout.model_dir} does not exist: run `domaintune train` first (export reads the trained model)"
        )
    _remove_stale_staging(layout)
    note = unmergeable_note(layout.model_dir)
    with atomic_dir(layout.export_dir) as staging:
        manifest = _adapter_only(cfg, layout, staging, note) if note else _build(cfg, layout, staging)
        manifest["files"] = file_checksums(staging)
        write_json(staging / layout.export_manifest.name, manifest)
    return manifest


def _adapter_only(cfg: ProjectConfig, layout: RunLayout, staging: Path, note: str) -> dict:
    """Prefix/prompt/P-tuning adapters add virtual tokens, not weights: the export is the adapter itself."""
    console.print(f"[yellow]note:[/] {note}")
    shutil.copytree(layout.model_dir, staging / "adapter")
    return {
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "project": cfg.name,
        "source": _source(cfg, layout.model_dir, True),
        "artifacts": {"adapter": {"path": "adapter", "kind": "adapter", "note": note}},
        "skipped": {"merged, int8, bitsandbytes, pruned, gguf": note},
        "config": cfg.export.model_dump(mode="json"),
        "libraries": library_versions(EXPORT_LIBRARIES),
    }


def _remove_stale_staging(layout: RunLayout) -> None:
    """Staging folders of exports that were killed (their process is gone) are deleted."""
    stale = remove_stale_staging(layout.root, layout.export_dir.name)
    for folder in layout.root.glob(".export-staging-*"):  # the staging name of earlier versions
        pid = folder.name.split("-")[2]
        if not pid.isdigit() or not pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            stale.append(folder)
    for folder in stale:
        log.info("removed %s left by an interrupted export", folder)


def _build(cfg: ProjectConfig, layout: RunLayout, staging: Path) -> dict:
    """merge -> int8 -> bitsandbytes -> pruned -> gguf (llama.cpp), each artefact measured as it is made; then the manifest."""
    import torch

    ecfg = cfg.export
    started = time.perf_counter()
    apply_threads(ecfg.num_threads)  # auto: one per usable physical core
    rows, metric_skip = _val_rows(layout, ecfg.eval_rows)
    check_gguf_plan(cfg, layout.model_dir)  # before anything is built: fails with the key to change
    if metric_skip:
        console.print(f"[yellow]warning:[/] {metric_skip}")
    model, tokenizer, adapter = _load_trained(cfg, layout.model_dir)
    bench = _bench(cfg, layout, tokenizer, rows)

    model, merge_check = _merge(model, adapter, bench, layout.model_dir)
    merged_dir = _save_merged(model, tokenizer, staging / "merged", ecfg.merged_dtype, layout.model_dir)
    del model
    gc.collect()
    reference, artifacts = _measure_merged(merged_dir, bench)
    if ecfg.int8:
        artifacts["int8"] = _int8(reference, staging / "int8", bench)
    for kind in ecfg.bitsandbytes:
        artifacts[f"bnb-{kind}"] = _bitsandbytes(merged_dir, staging / f"bnb-{kind}", kind)
    if ecfg.prune_sparsity is not None:
        artifacts["pruned"] = _pruned(reference, staging / "pruned", ecfg.prune_sparsity, bench)
    artifacts.update(_gguf(cfg, merged_dir, staging / "gguf", reference, bench, rows))
    _with_deltas(artifacts, "merged")

    return {
        "created_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "project": cfg.name,
        "source": _source(cfg, layout.model_dir, adapter),
        "merge": merge_check,
        **_measures(cfg, bench, metric_skip),
        "artifacts": artifacts,
        "config": ecfg.model_dump(mode="json"),
        "libraries": library_versions(EXPORT_LIBRARIES),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }


# ---------------------------------------------------------------------- the steps of _build, in order


def _val_rows(layout: RunLayout, limit: int) -> tuple[list[dict], str | None]:
    path = layout.val_file
    if not path.is_file():
        return [], f"{path} not found (run `domaintune data` first): metrics are not measured"
    rows = []
    for row in read_jsonl(path):
        rows.append(row)
        if len(rows) >= limit:
            break
    return rows, None


def _load_trained(cfg: ProjectConfig, model_dir: Path) -> tuple[Any, Any, bool]:
    """(model, tokenizer, whether it is an adapter): an adapter comes on its base, not yet merged."""
    from domaintune.model.loader import apply_chat_template_setting, is_adapter_dir, load_trained

    adapter = is_adapter_dir(model_dir)
    _say(f"loading {'adapter + base' if adapter else 'full model'} from {model_dir}")
    model, tokenizer = load_trained(model_dir, dtype="float32", merge=False)
    apply_chat_template_setting(tokenizer, cfg.model.chat_template, source=str(model_dir), thinking=cfg.model.thinking)
    return model, tokenizer, adapter


@dataclass
class _Bench:
    """What every artefact is measured on, the same for all of them."""

    cfg: ProjectConfig
    tokenizer: Any  # the trained model's, with the configured chat template
    examples: list[tuple[list[int], int]]  # val rows for perplexity: (input ids, where the answer starts)
    quality_rows: list[dict]  # test rows answered and scored with the eval stage's metric
    quality_skip: str | None
    probes: list[list[int]]  # token sequences whose logits are compared with the merged model's
    prompts: list[list[dict]]  # chat prompts for timing generation


def _bench(cfg: ProjectConfig, layout: RunLayout, tokenizer: Any, rows: list[dict]) -> _Bench:
    ecfg = cfg.export
    examples = measure.eval_examples(tokenizer, rows, ecfg.eval_max_length)
    quality_rows, quality_skip = _test_rows(layout, ecfg.eval_items)
    if quality_rows:
        try:
            import domaintune.eval.metrics  # noqa: F401 - the eval stage's scorers
        except ImportError as exc:
            quality_rows, quality_skip = [], f"the eval stage's metrics cannot be imported ({exc})"
    if quality_skip and ecfg.eval_items:
        console.print(f"[yellow]warning:[/] {quality_skip}")
    return _Bench(
        cfg=cfg,
        tokenizer=tokenizer,
        examples=examples,
        quality_rows=quality_rows,
        quality_skip=quality_skip,
        probes=_probe_sequences(tokenizer, examples),
        prompts=_speed_prompts(rows, ecfg.speed_prompts),
    )


def _test_rows(layout: RunLayout, limit: int) -> tuple[list[dict], str | None]:
    if limit == 0:
        return [], "export.eval_items is 0"
    path = layout.test_file
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


def _probe_sequences(tokenizer: Any, examples: list[tuple[list[int], int]]) -> list[list[int]]:
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


def _merge(model: Any, adapter: bool, bench: _Bench, model_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Merge an adapter into its base and check the merged model gives the same logits (a full model passes through)."""
    import torch

    merge_check: dict[str, Any] = {"adapter": adapter}
    if not adapter:
        return model, merge_check
    from peft import PeftModel

    tolerance = bench.cfg.export.merge_tolerance
    if not isinstance(model, PeftModel):
        raise UserError(f"{model_dir}: adapter_config.json present but the folder did not load as a PEFT adapter")
    with torch.inference_mode():
        unmerged = [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in bench.probes]
    model = model.merge_and_unload()
    with torch.inference_mode():
        merged_logits = [model(input_ids=torch.tensor([ids])).logits[0].float() for ids in bench.probes]
    diff = max(float((a - b).abs().max()) for a, b in zip(unmerged, merged_logits))
    merge_check.update({"max_abs_logit_diff": diff, "tolerance": tolerance})
    if diff > tolerance:
        raise RuntimeError(f"merged model differs from base+adapter by {diff:.3g} > {tolerance}")
    _say(f"merged adapter into base: max |logit diff| {diff:.2e}")
    return model, merge_check


def _save_merged(model: Any, tokenizer: Any, merged_dir: Path, dtype: str, trained_dir: Path) -> Path:
    """The merged weights and tokenizer, with the SentencePiece `tokenizer.model` of the trained folder or its
    base, which llama.cpp's converter needs to give the GGUF the model's own vocabulary."""
    from domaintune.model.loader import end_of_turn_token_ids, tokenizer_model_sources, torch_dtype
    from domaintune.model.spm_vocab import carry_tokenizer_model

    model = model.to(torch_dtype(dtype))
    model.generation_config.eos_token_id = end_of_turn_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
    carry_tokenizer_model(merged_dir, tokenizer, tokenizer_model_sources(trained_dir))
    return merged_dir


def _measure_merged(merged_dir: Path, bench: _Bench) -> tuple[Any, dict[str, dict]]:
    """The merged model loaded back in float32: the reference every other artefact is compared with."""
    import torch
    from transformers import AutoModelForCausalLM

    reference, load_s = measure.timed(lambda: AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    reference.eval()
    entry = _measure("merged", reference, bench.tokenizer, bench, merged_dir, load_s)
    entry["dtype"] = bench.cfg.export.merged_dtype
    return reference, {"merged": entry}


def _int8(reference: Any, folder: Path, bench: _Bench) -> dict[str, Any]:
    """Dynamic INT8 (CPU) of the merged model, loaded back and compared."""
    from domaintune.export.quantize import INT8_SPEC, load_int8, save_int8

    _say("[int8] dynamic INT8 quantisation of Linear layers")
    int8_dir = save_int8(copy.deepcopy(reference), bench.tokenizer, folder, exclude=bench.cfg.export.int8_exclude)
    (int8_model, int8_tok), load_s = measure.timed(lambda: load_int8(int8_dir))
    entry = _measure("int8", int8_model, int8_tok, bench, int8_dir, load_s)
    entry["logits_vs_merged"] = measure.compare_logits(reference, int8_model, bench.probes)
    entry["loader"] = "domaintune.export.quantize.load_int8"
    int8_spec = json.loads((int8_dir / INT8_SPEC).read_text(encoding="utf-8"))
    entry["layers"] = {"quantized": len(int8_spec["quantized"]), "kept_float": int8_spec["kept_float"]}
    del int8_model
    gc.collect()
    return entry


def _bitsandbytes(merged_dir: Path, folder: Path, kind: str) -> dict[str, Any]:
    """bitsandbytes 4-/8-bit (GPU): saved, not measured."""
    from domaintune.export.quantize import save_bitsandbytes

    saved = save_bitsandbytes(merged_dir, folder, int(kind[0]))
    return {"path": saved.name, "bytes": measure.folder_size(saved)}


def _pruned(reference: Any, pruned_dir: Path, sparsity: float, bench: _Bench) -> dict[str, Any]:
    """Magnitude pruning of a copy of the merged model, saved and measured."""
    from domaintune.export.prune import magnitude_prune

    _say(f"[pruned] magnitude pruning to {sparsity:.0%} sparsity")
    pruned = copy.deepcopy(reference)
    stats = magnitude_prune(pruned, sparsity)
    pruned.save_pretrained(pruned_dir, safe_serialization=True)
    bench.tokenizer.save_pretrained(pruned_dir)
    entry = _measure("pruned", pruned, bench.tokenizer, bench, pruned_dir, None)
    entry["sparsity"] = stats
    del pruned
    gc.collect()
    return entry


def _gguf(cfg: ProjectConfig, merged_dir: Path, gguf_dir: Path, reference: Any, bench: _Bench, rows) -> dict:
    """GGUF files by llama.cpp (converted, quantised, verified in llama.cpp) and the Modelfile beside them."""
    from domaintune.export.gguf import build_ggufs

    if not cfg.export.gguf:
        return {}
    tok = bench.tokenizer
    speed = [
        tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
        for p in bench.prompts
    ]
    return build_ggufs(cfg, merged_dir, gguf_dir, rows, reference, speed)


def _with_deltas(artifacts: dict[str, dict], reference: str) -> None:
    ref = artifacts[reference]
    for entry in artifacts.values():
        if "failed" in entry:
            continue
        entry["size_ratio_vs_merged"] = round(entry["bytes"] / ref["bytes"], 4)
        if "speed" in entry:
            entry["speed_ratio_vs_merged"] = round(entry["speed"]["tokens_per_s"] / ref["speed"]["tokens_per_s"], 4)
        if "metric" in entry and "metric" in ref:
            entry["perplexity_delta_vs_merged"] = entry["metric"]["perplexity"] - ref["metric"]["perplexity"]
        if "quality" in entry and "quality" in ref:
            entry["quality_delta_vs_merged"] = entry["quality"]["mean"] - ref["quality"]["mean"]


def _source(cfg: ProjectConfig, model_dir: Path, adapter: bool) -> dict[str, Any]:
    """What was exported: the trained model's files with their checksums."""
    return {
        "model_dir": str(model_dir),
        "adapter": adapter,
        "files": [{"path": p["path"], "sha256": p["sha256"]} for p in file_checksums(model_dir)],
        "base_model": cfg.model.name_or_path,
    }


def _measures(cfg: ProjectConfig, bench: _Bench, metric_skip: str | None) -> dict[str, Any]:
    """How the artefacts were measured: the perplexity on val rows and the answer quality on test rows."""
    ecfg, metric = cfg.export, cfg.eval.primary_metric
    quality_rows = bench.quality_rows
    return {
        "metric": {
            "name": "perplexity",
            "description": METRIC_DESCRIPTION.format(rows=len(bench.examples)) if bench.examples else None,
            "skipped": metric_skip,
        },
        "quality": {
            "metric": metric,
            "scorer": "domaintune.eval.metrics.score_item",
            "description": (
                f"greedy answers to the first {len(quality_rows)} rows of data/test.jsonl "
                f"(max {ecfg.eval_max_new_tokens} new tokens), scored with the eval stage's "
                f"{metric} (x100; higher is better)"
            )
            if quality_rows
            else None,
            "skipped": bench.quality_skip,
        },
    }


# ---------------------------------------------------------------------- measuring one artefact


def _measure(name: str, model: Any, tokenizer: Any, bench: _Bench, path: Path, load_s: float | None) -> dict[str, Any]:
    ecfg = bench.cfg.export
    entry: dict[str, Any] = {"path": path.name, "bytes": measure.folder_size(path)}
    if load_s is not None:
        entry["load_s"] = round(load_s, 3)
    _say(f"[{name}] timing generation ({len(bench.prompts)} prompts x {ecfg.speed_new_tokens} tokens)")
    entry["speed"] = measure.generation_speed(model, tokenizer, bench.prompts, ecfg.speed_new_tokens)
    if bench.examples:
        _say(f"[{name}] perplexity on {len(bench.examples)} val rows")
        entry["metric"] = measure.perplexity(model, bench.examples)
    quality = _quality(name, model, tokenizer, bench)
    if quality is not None:
        entry["quality"] = quality
    return entry


def _quality(name: str, model: Any, tokenizer: Any, bench: _Bench) -> dict | None:
    if not bench.quality_rows:
        return None
    metric = bench.cfg.eval.primary_metric
    _say(f"[{name}] answering {len(bench.quality_rows)} test prompts (scored with eval's {metric})")
    return measure.answer_quality(model, tokenizer, bench.quality_rows, metric, bench.cfg.export.eval_max_new_tokens)


# ---------------------------------------------------------------------- the manifest


def file_checksums(folder: Path, skip: Collection[str] = frozenset()) -> list[dict]:
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


def _say(message: str) -> None:
    console.log(message, highlight=False, markup=False)
