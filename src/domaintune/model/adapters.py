"""What a trained adapter folder can become: merged weights, or only an adapter applied at run time.

LoRA-like adapters (LoRA, DoRA, IA3, ...) add to the base weights and merge into them. Prompt-learning
adapters (prefix, prompt and p-tuning) add virtual tokens or per-layer key/values: there is no weight
to add them to, so they are evaluated, exported and served unmerged, on their base model.
"""

from __future__ import annotations

import json
from pathlib import Path

# peft_type values whose adapters live in virtual tokens / past key-values, not in the weights.
PROMPT_LEARNING_TYPES = frozenset({"PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT"})

UNMERGEABLE_NOTE = (
    "{kind} adapters (train.method prefix, prompt or ptuning) add virtual tokens, not weights: they cannot be "
    "merged into the base model, so there is no merged folder, INT8 or GGUF artefact for this run. "
    "The adapter folder is the artefact: load it on its base with peft (PeftModel.from_pretrained) or serve it "
    "with `domaintune serve` (transformers engine), which applies it unmerged."
)


def adapter_peft_type(path: str | Path) -> str | None:
    """The adapter's peft_type (e.g. "LORA", "PREFIX_TUNING"), or None for a folder that is no adapter."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return str(json.loads(config.read_text(encoding="utf-8")).get("peft_type") or "").upper() or None


def is_prompt_learning_adapter(path: str | Path) -> bool:
    return adapter_peft_type(path) in PROMPT_LEARNING_TYPES


def is_mergeable_adapter(path: str | Path) -> bool:
    """True for an adapter folder whose weights merge into the base (LoRA, DoRA, IA3, ...)."""
    peft_type = adapter_peft_type(path)
    return peft_type is not None and peft_type not in PROMPT_LEARNING_TYPES


def unmergeable_note(path: str | Path) -> str | None:
    """The note an export manifest (or a log) carries for an adapter that cannot be merged; None otherwise."""
    peft_type = adapter_peft_type(path)
    if peft_type not in PROMPT_LEARNING_TYPES:
        return None
    return UNMERGEABLE_NOTE.format(kind=peft_type)
