"""GGUF files built once per model folder and kept in a cache, for engines that start from Hugging Face folders.

A folder (base model, merged model, or base + LoRA adapter merged here) is keyed by the names, sizes and
modification times of its files, so a retrained adapter gets a new GGUF and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from domaintune.utils.io import atomic_dir

log = logging.getLogger("domaintune.llamacpp")


def gguf_cache_root() -> Path:
    env = os.environ.get("DOMAINTUNE_CACHE")
    base = Path(env).parent if env else Path.home() / ".cache" / "domaintune"
    return base / "gguf"


def folder_key(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        folder = Path(folder).resolve()
        digest.update(str(folder).encode())
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def merged_adapter(adapter_dir: Path, base_dir: Path, root: Path | None = None) -> Path:
    """The adapter merged into its base, as a plain Hugging Face folder (built once)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.model.spm_vocab import carry_tokenizer_model

    target = (root or gguf_cache_root()) / f"merged-{folder_key(adapter_dir, base_dir)}"
    if (target / "config.json").is_file():
        return target
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tokenizer_source = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").is_file() else base_dir
    with atomic_dir(target, if_exists="keep") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        tokenizer.save_pretrained(staging)
        carry_tokenizer_model(staging, tokenizer, [Path(adapter_dir), Path(base_dir)])
    return target


def gguf_for(hf_dir: Path, qtype: str = "q8_0", root: Path | None = None) -> Path:
    """A GGUF of `hf_dir` in `qtype` (converted to f16 by llama.cpp's converter, then quantised)."""
    from domaintune.llamacpp.quantize import check_gguf_type, quantize
    from domaintune.llamacpp.tools import convert_hf

    check_gguf_type(qtype)
    folder = (root or gguf_cache_root()) / f"model-{folder_key(hf_dir)}"
    target = folder / f"model-{qtype}.gguf"
    if target.is_file():
        return target
    f16 = folder / "model-f16.gguf"
    if not f16.is_file():
        log.info("converting %s to GGUF (once) in %s", hf_dir, folder)
        convert_hf(hf_dir, f16, "f16")
        (folder / "SOURCE.json").write_text(json.dumps({"source": str(Path(hf_dir).resolve())}), encoding="utf-8")
    if qtype != "f16":
        quantize(f16, target, qtype)
    return target
