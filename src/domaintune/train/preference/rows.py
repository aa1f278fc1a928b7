"""The datasets of the preference and reinforcement methods: rows read, converted, deduplicated and split.

Pairs (orpo, simpo, reward, and dpo's file layouts), unpaired rows (kto) and prompt rows (grpo, ppo) are read
with `data/preference_rows.py`'s conversions; exact duplicates (on the prompt and answers, normalised) are
dropped and counted; without a `val_path`, 10% (at least one row) is held out with the run's seed. What was used
goes into train/metrics.json's `data` like the SFT sets' accounting. Pairs, unpaired rows and prompt rows that use
tools are rendered with their tools through the chat template (train/preference/tool_rows.py).
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.data.preference_rows import RowError, convert, text_key
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.train.preference.tool_rows import ToolRows, prompt_dataset, to_dataset, uses_tools
from domaintune.utils.io import fingerprint_files, read_jsonl_numbered

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

# The columns each kind hands to trl (extra fields of pairs and unpaired rows are left out: trl tokenises rows).
COLUMNS = {"preference": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label")}
KIND_OF = {"dpo": "preference", "orpo": "preference", "simpo": "preference", "reward": "preference",
           "kto": "unpaired", "grpo": "prompt", "ppo": "prompt"}  # fmt: skip
UNPAIRED_HELP = "write it with `domaintune feedback export CONFIG` (thumbs up/down), or set train.kto.path"


def _norm_key(row: dict[str, Any]) -> str:
    return hashlib.sha256(" ".join(text_key(row).lower().split()).encode()).hexdigest()


def read_rows(
    path: Path, kind: str, limit: int | None = None, tool_rows: ToolRows | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of `kind` from a JSONL file, exact duplicates dropped; returns (rows, counts). With `tool_rows`, rows
    that use tools are made ready for the chat template (counted as `tool_rows`)."""
    if not path.is_file():
        hint = (
            UNPAIRED_HELP if kind == "unpaired" else "write it with `domaintune feedback export` or `domaintune data`"
        )
        raise UserError(f"{path}: {kind} file not found ({hint})")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    counts = {"read": 0, "duplicates": 0}
    try:
        for line_no, raw in read_jsonl_numbered(path):
            counts["read"] += 1
            try:
                converted = convert(raw, kind)
            except RowError as exc:
                raise UserError(f"{path}:{line_no}: {exc}") from None
            for row in converted:
                key = _norm_key(row)
                if key in seen:
                    counts["duplicates"] += 1
                    continue
                seen.add(key)
                row = _columns(row, kind)
                if tool_rows is not None and (uses_tools(row) if kind != "prompt" else row.get("tools")):
                    row = tool_rows(row, f"{path}:{line_no}")
                    counts["tool_rows"] = counts.get("tool_rows", 0) + 1
                rows.append(row)
            if limit is not None and len(rows) >= limit:
                rows = rows[:limit]
                break
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not rows:
        raise UserError(f"{path}: no {kind} rows")
    counts["rows"] = len(rows)
    return rows, counts


def _columns(row: dict[str, Any], kind: str) -> dict[str, Any]:
    if kind in COLUMNS:
        return {k: row[k] for k in (*COLUMNS[kind], "tools") if k in row}
    scalar = (str, int, float, bool, type(None))
    return {k: v for k, v in row.items() if k in ("prompt", "tools") or isinstance(v, scalar)}


def split_rows(rows: list[dict[str, Any]], seed: int, path: Path) -> tuple[list[dict], list[dict]]:
    """(train, val): 10% (at least one row) held out, shuffled with the seed."""
    if len(rows) < 2:
        raise UserError(f"{path}: need at least 2 rows to hold one out for validation (or set val_path)")
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, len(rows) // 10)
    return shuffled[n_val:], shuffled[:n_val]


def default_path(cfg: ProjectConfig, layout: RunLayout, kind: str) -> Path:
    """Where each kind comes from by default: the data stage's train split for prompt rows or when the data stage
    wrote preference / unpaired / prompt rows (data.kind), else feedback export's pairs / unpaired rows."""
    if kind == "prompt" or cfg.data.kind != "sft":
        return layout.train_file
    from domaintune.serve.feedback import PREFERENCE_FILE, UNPAIRED_FILE, feedback_export_dir

    name = UNPAIRED_FILE if kind == "unpaired" else PREFERENCE_FILE
    return feedback_export_dir(cfg, layout.root) / name


def _paths(cfg: ProjectConfig, layout: RunLayout) -> tuple[Path, Path | None]:
    tcfg = cfg.train
    section = getattr(tcfg, tcfg.method)
    kind = KIND_OF[tcfg.method]
    if kind == "prompt":
        path = section.prompts_path or default_path(cfg, layout, kind)
        return Path(path), Path(section.val_prompts_path) if section.val_prompts_path else layout.val_file
    path = section.path or default_path(cfg, layout, kind)
    if section.val_path:
        return Path(path), Path(section.val_path)
    return Path(path), layout.val_file if not section.path and cfg.data.kind != "sft" else None


def preference_data(
    cfg: ProjectConfig, layout: RunLayout, seed: int, tokenizer: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """(train, val, info): the datasets.Dataset pair for a preference or reinforcement method and its accounting.
    Rows that use tools are rendered with `tokenizer`'s chat template (refused, naming the row, when it cannot)."""
    tcfg = cfg.train
    kind = KIND_OF[tcfg.method]
    path, val_path = _paths(cfg, layout)
    tool_rows = ToolRows(tokenizer)
    rows, counts = read_rows(path, kind, tcfg.max_train_samples, tool_rows)
    files = [path]
    if val_path is not None and val_path.is_file():
        val, val_counts = read_rows(val_path, kind, tcfg.max_val_samples, tool_rows)
        files.append(val_path)
        train = rows
    else:
        train, val = split_rows(rows, seed, path)
        val, val_counts = val[: tcfg.max_val_samples or len(val)], {"rows": len(val)}
    train_info: dict[str, Any] = {**counts, "rows": len(train)}
    if kind == "unpaired":
        train_info["desirable"] = sum(bool(r["label"]) for r in train)
        train_info["undesirable"] = len(train) - train_info["desirable"]
    info = {
        "kind": kind,
        "train_file": str(path),
        "val_file": str(val_path) if len(files) > 1 else None,
        "train": train_info,
        "val": {**val_counts, "rows": len(val)},
        "fingerprint": fingerprint_files(files),
        "truncated": None,
    }
    if kind in COLUMNS:
        return to_dataset(train, tcfg.method, tokenizer), to_dataset(val, tcfg.method, tokenizer), info
    return prompt_dataset(train, tokenizer), prompt_dataset(val, tokenizer), info
