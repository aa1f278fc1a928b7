"""Checkpoints in `<run>/train/checkpoints`: the one to resume from, and the identity a resumed run must keep."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.train.config import TrainConfig
from domaintune.utils.io import write_json

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
RUN_IDENTITY_FILE = "run_identity.json"
# Settings that define what the checkpoints are; max_steps, cadence etc. may change on resume.
IDENTITY_SETTINGS = (
    "method",
    "lora",
    "freeze",
    "prompt_learning",
    "ia3",
    "distill",
    "dpo",
    "init_from",
    "max_length",
    "packing",
    "batch_size",
    "gradient_accumulation_steps",
    "replay",
    "seed",
    "max_train_samples",
)


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """Newest checkpoint whose trainer_state.json (written last) parses; a half-written one is skipped."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = []
    for child in checkpoint_dir.iterdir():
        step = child.name[len(CHECKPOINT_PREFIX) :]
        if child.is_dir() and child.name.startswith(CHECKPOINT_PREFIX) and step.isdigit():
            candidates.append((int(step), child))
    for _, child in sorted(candidates, reverse=True):
        try:
            json.loads((child / "trainer_state.json").read_text())
            return child
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s", child)
    return None


def resume_point(layout: RunLayout, resume: bool) -> Path | None:
    """The checkpoint `--resume` continues from (None without --resume); a missing one is a user error."""
    if not resume:
        return None
    found = last_complete_checkpoint(layout.checkpoints_dir)
    if found is None:
        raise UserError(f"--resume: no complete checkpoint in {layout.checkpoints_dir} (train without --resume)")
    return found


def prepare_train_dir(layout: RunLayout, tcfg: TrainConfig, fingerprint: str, resume: bool) -> None:
    """Check (resume) or record (fresh run) what the checkpoints are of; a fresh run drops old checkpoints."""
    check_resume_identity(layout.train_dir, tcfg, fingerprint, resume)
    if not resume and layout.checkpoints_dir.exists():
        log.info("starting fresh: removing old checkpoints in %s", layout.checkpoints_dir)
        shutil.rmtree(layout.checkpoints_dir)


def check_resume_identity(train_dir: Path, tcfg: TrainConfig, fingerprint: str, resume: bool) -> None:
    """A resumed run must see the same data and settings as the run that wrote the checkpoints."""
    path = train_dir / RUN_IDENTITY_FILE
    settings = {k: v for k, v in tcfg.model_dump(mode="json").items() if k in IDENTITY_SETTINGS}
    if resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != fingerprint:
            raise UserError(
                "--resume: the training files changed since the checkpoints were written "
                "(data fingerprint differs); train again without --resume"
            )
        old_settings = old.get("settings", {})
        changed = sorted(k for k in set(settings) | set(old_settings) if settings.get(k) != old_settings.get(k))
        if changed:
            raise UserError(f"--resume: train settings changed since the checkpoints were written: {changed}")
    elif not resume:
        write_json(path, {"fingerprint": fingerprint, "settings": settings})
