"""`<run>/model/`: what the best checkpoint holds, as an adapter folder or full weights, published in one rename.

Beside the weights: the tokenizer, `domaintune.json` (method, kind, base) and, for an adapter, a portable
base reference, so `load_trained` finds the base on another machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from domaintune.layout import RunLayout
from domaintune.model.loader import BUNDLED_GEMMA3, BUNDLED_SMOLLM2, TINY_RANDOM_LLAMA
from domaintune.model.spm_vocab import carry_tokenizer_model
from domaintune.train.config import TrainConfig
from domaintune.train.init_from import Start
from domaintune.utils.io import STAGING_MARK, atomic_dir, publish_dir, remove_stale_staging

MODEL_INFO_FILE = "domaintune.json"


def save_model(trainer, tokenizer, layout: RunLayout, start: Start, tcfg: TrainConfig, distributed: bool) -> str:
    """Write model/ from the Trainer's model (load_best_model_at_end put the best checkpoint there).

    Returns the kind saved: `adapter` or `full`."""
    if distributed:
        return _save_distributed(trainer, tokenizer, layout, start, tcfg)
    from peft import PeftModel

    model = trainer.model
    kind = "adapter" if isinstance(model, PeftModel) else "full"
    remove_stale_staging(layout.root, layout.model_dir.name)
    with atomic_dir(layout.model_dir) as staging:
        if kind == "adapter":
            model.save_pretrained(str(staging))
        else:
            model.config.use_cache = True
            model.save_pretrained(staging, safe_serialization=True)
        _complete_model_folder(staging, kind, tokenizer, start, tcfg)
    return kind


def _save_distributed(trainer, tokenizer, layout: RunLayout, start: Start, tcfg: TrainConfig) -> str:
    """Gather the (possibly sharded) weights with the Trainer's own save_model; rank 0 writes a plain folder.

    Every rank takes part (a collective under FSDP and ZeRO-3), so the staging folder has a name all ranks agree on.
    """
    from peft import PeftModel

    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    kind = "adapter" if isinstance(unwrapped, PeftModel) else "full"
    if kind == "full":
        unwrapped.config.use_cache = True
    staging = layout.model_dir.with_name(f".{layout.model_dir.name}{STAGING_MARK}distributed")
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    if getattr(trainer, "is_fsdp_enabled", False):
        from domaintune.train.distributed import save_fsdp_consolidated

        save_fsdp_consolidated(trainer, unwrapped, staging)
    else:
        trainer.save_model(str(staging))  # a collective under ZeRO-3: every rank takes part, rank 0 writes
    if trainer.args.should_save:
        (staging / "training_args.bin").unlink(missing_ok=True)
        _complete_model_folder(staging, kind, tokenizer, start, tcfg)
        publish_dir(staging, layout.model_dir)
    trainer.accelerator.wait_for_everyone()
    return kind


def _complete_model_folder(folder: Path, kind: str, tokenizer, start: Start, tcfg: TrainConfig) -> None:
    """Portable adapter base, tokenizer and domaintune.json beside the saved weights."""
    if kind == "adapter":
        # Record a portable base reference so load_trained finds it on another machine.
        cfg_path = folder / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = adapter_base_reference(start)
        cfg_path.write_text(json.dumps(data, indent=2))
    tokenizer.save_pretrained(folder)
    carry_tokenizer_model(folder, tokenizer, [start.model_dir])  # transformers saves no SentencePiece model
    info = {"method": tcfg.method, "trained_as": tcfg.trained_as, "kind": kind, "base": str(start.model_dir)}
    (folder / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2))


def adapter_base_reference(start: Start) -> str:
    """What adapter_config.json records as base: the bundled/tiny name (portable) or the folder."""
    if start.model_cfg.name_or_path in (BUNDLED_SMOLLM2, BUNDLED_GEMMA3, TINY_RANDOM_LLAMA):
        return start.model_cfg.name_or_path
    return str(start.model_dir)
