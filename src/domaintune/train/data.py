"""The training and validation sets of a run: tokenised SFT examples from `<run>/data/`, or DPO pairs.

`dataset.py` holds the pieces (reading rows, assistant-only labels, replay mixing, collators); this
module puts them together for the configured method and records what was used (files, counts,
truncation, a fingerprint of the files' contents) for train/metrics.json and the resume check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.train.config import TrainConfig
from domaintune.train.dataset import (
    EncodeStats,
    ReplayMixDataset,
    encode_rows,
    load_message_rows,
    load_preference_rows,
    make_collator,
)
from domaintune.utils.io import fingerprint_files

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig


@dataclass
class TrainData:
    train: Any  # a list of examples, a ReplayMixDataset, or (DPO) a datasets.Dataset of pairs
    val: Any
    info: dict[str, Any]  # files, row and token counts, fingerprint, truncated: train/metrics.json's `data`
    collator: Any = None  # None: the Trainer's own (DPO)

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]


def build_datasets(cfg: ProjectConfig, layout: RunLayout, tokenizer, seed: int) -> TrainData:
    """SFT examples with assistant-only labels, or DPO's preference pairs."""
    if cfg.train.method == "dpo":
        if cfg.data.kind != "sft" and not cfg.train.dpo.path:  # the data stage's preference splits
            return dpo_data(cfg.train, seed, tokenizer, layout.train_file, layout.val_file)
        return dpo_data(cfg.train, seed, tokenizer, default_preference_path(cfg, layout))
    if cfg.train.trainer_loss == "preference":  # kto, orpo, simpo, reward, ppo, grpo: train/preference/rows.py
        from domaintune.train.preference.rows import preference_data

        return TrainData(*preference_data(cfg, layout, seed, tokenizer))
    if cfg.data.kind != "sft":
        raise UserError(
            f"train.method {cfg.train.method!r} trains on chats, but data.kind is {cfg.data.kind!r}: the data stage "
            f"wrote {cfg.data.kind} rows to {layout.train_file} (train them with dpo/orpo/simpo/reward/kto/grpo/ppo, "
            "or set data.kind: sft)"
        )
    return sft_data(cfg.train, tokenizer, layout, seed)


def _encode_split(tokenizer, path: Path, limit: int | None, max_length: int) -> tuple[list[dict], EncodeStats]:
    examples, stats = encode_rows(tokenizer, load_message_rows(path, limit), max_length)
    if not examples:
        raise UserError(f"{path}: no example keeps an assistant token within max_length={max_length}")
    return examples, stats


def sft_data(tcfg: TrainConfig, tokenizer, layout: RunLayout, seed: int) -> TrainData:
    train_path, val_path = layout.train_file, layout.val_file
    train_examples, train_stats = _encode_split(tokenizer, train_path, tcfg.max_train_samples, tcfg.max_length)
    val_examples, val_stats = _encode_split(tokenizer, val_path, tcfg.max_val_samples, tcfg.max_length)
    files = [train_path, val_path]
    info: dict[str, Any] = {
        "train_file": str(train_path),
        "val_file": str(val_path),
        "train": train_stats.as_dict(),
        "val": val_stats.as_dict(),
    }
    train_ds: Any = train_examples
    if tcfg.replay.ratio > 0:
        general_path = Path(tcfg.replay.path) if tcfg.replay.path else layout.general_file
        train_ds, info["replay"] = _replay_mix(tcfg, tokenizer, train_examples, general_path, seed)
        files.append(general_path)
    info["fingerprint"] = fingerprint_files(files)
    info["truncated"] = train_stats.truncated
    return TrainData(train_ds, val_examples, info, make_collator(tokenizer, tcfg.packing))


def _replay_mix(tcfg: TrainConfig, tokenizer, train_examples: list[dict], general_path: Path, seed: int):
    """The domain examples plus a fresh sample of general rows every epoch; returns (dataset, info)."""
    general_rows = load_message_rows(general_path)
    general_examples, general_stats = encode_rows(tokenizer, general_rows, tcfg.max_length, EncodeStats())
    if not general_examples:
        raise UserError(f"{general_path}: no usable replay rows within max_length={tcfg.max_length}")
    mix = ReplayMixDataset(train_examples, general_examples, tcfg.replay.ratio, seed)
    info = {
        "file": str(general_path),
        "ratio": tcfg.replay.ratio,
        "rows_per_epoch": mix.n_replay,
        "general_rows": len(general_examples),
        "general": general_stats.as_dict(),
    }
    return mix, info


def default_preference_path(cfg: ProjectConfig, layout: RunLayout) -> Path:
    """DPO's default pairs: the file `domaintune feedback export` writes (<serve.feedback_dir>/preference.jsonl)."""
    from domaintune.serve.feedback import PREFERENCE_FILE, feedback_export_dir

    return feedback_export_dir(cfg, layout.root) / PREFERENCE_FILE


def dpo_data(
    tcfg: TrainConfig, seed: int, tokenizer: Any, default_path: Path, default_val: Path | None = None
) -> TrainData:
    """DPO's pairs; pairs that use tools are rendered with them through the chat template (tool_rows.py)."""
    import random

    from domaintune.train.preference.tool_rows import ToolRows, to_dataset

    path = Path(tcfg.dpo.path) if tcfg.dpo.path else default_path
    tool_rows = ToolRows(tokenizer)
    rows = load_preference_rows(path, tcfg.max_train_samples, tool_rows)
    files = [path]
    val_path = Path(tcfg.dpo.val_path) if tcfg.dpo.val_path else default_val
    if val_path is not None:
        val = load_preference_rows(val_path, tcfg.max_val_samples, tool_rows)
        files.append(val_path)
        train = rows
    else:
        if len(rows) < 2:
            raise UserError(f"{path}: need at least 2 preference rows to hold one out for validation")
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        n_val = max(1, len(rows) // 10)
        val, train = shuffled[:n_val], shuffled[n_val:]
    info = {
        "train_file": str(path),
        "train": {"rows": len(train)},
        "val": {"rows": len(val)},
        "fingerprint": fingerprint_files(files),
        "truncated": None,
    }
    return TrainData(to_dataset(train, "dpo", tokenizer), to_dataset(val, "dpo", tokenizer), info)
