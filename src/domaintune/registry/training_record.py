"""What a version records about how it was tuned: the method, its reward definition and its reference model.

`training_record` goes into the version's metadata as `training`; `describe` gives the lines `registry show` prints.
- reward: grpo's verifier components (type, weight, pass_at and their settings) and group scaling; ppo's reward
  model folder (with its sha256 fingerprint); dpo/kto's implicit reward (beta-scaled log-ratio to the reference);
  orpo's odds ratio and simpo's length-normalised margin (reference-free); a reward model's own objective.
- reference: the start model (the base, or train.init_from) that dpo, kto, ppo and grpo (beta > 0) are anchored
  to, with its KL coefficient; None for the reference-free methods and for SFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.utils.io import fingerprint_files

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig

_IMPLICIT = "implicit: beta x log-ratio of the policy to the reference"
_REWARDS: dict[str, str] = {
    "dpo": _IMPLICIT + " on (chosen, rejected) pairs",
    "kto": _IMPLICIT + " on desirable / undesirable answers",
    "orpo": "odds ratio of chosen over rejected beside the SFT loss (reference-free)",
    "simpo": "length-normalised log-probability margin of chosen over rejected (reference-free)",
    "reward": "a sequence-classification head trained on (chosen, rejected) pairs (Bradley-Terry)",
}
_ANCHORED = ("dpo", "kto", "ppo", "grpo")  # trained against a frozen reference with a KL coefficient
_SKIP = {"path", "val_path", "prompts_path", "val_prompts_path", "rewards", "reward_model"}


def training_record(cfg: ProjectConfig, train_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """{method, reward, reference, settings} of the run's training (reward/reference None where they do not apply)."""
    tcfg = cfg.train
    method = str((train_metrics or {}).get("method") or tcfg.method)
    base = (train_metrics or {}).get("base_model") or cfg.model.name_or_path
    section = getattr(tcfg, method, None) if method in (*_REWARDS, "ppo", "grpo") else None
    if section is None:
        return {"method": method, "reward": None, "reference": None, "settings": None}
    settings = section.model_dump(mode="json", exclude=_SKIP & set(type(section).model_fields))
    return {
        "method": method,
        "reward": _reward(method, section),
        "reference": _reference(method, section, tcfg.init_from, base),
        "settings": settings,
    }


def _reward(method: str, section: Any) -> dict[str, Any]:
    if method == "grpo":
        components = [
            {"name": spec.name or spec.type, **spec.model_dump(mode="json", exclude_defaults=True)}
            for spec in section.rewards
        ]
        return {"kind": "verifiers", "components": components, "scale_rewards": section.scale_rewards}
    if method == "ppo":
        folder = Path(section.reward_model)
        files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
        return {
            "kind": "reward_model",
            "model": str(folder),
            "fingerprint": fingerprint_files(files) if files else None,
        }
    return {"kind": method, "definition": _REWARDS[method]}


def _reference(method: str, section: Any, init_from: str | None, base: str) -> dict[str, Any] | None:
    beta = getattr(section, "beta", None)
    if method not in _ANCHORED or (method == "grpo" and not beta):
        return None
    return {"model": init_from or base, "kind": "init_from" if init_from else "base", "kl_coefficient": beta}


def describe(record: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, text) lines for `registry show`: the reward and the reference (nothing for a plain SFT version)."""
    if not record or (record.get("reward") is None and record.get("reference") is None):
        return []
    reward = record["reward"] or {}
    if reward.get("kind") == "verifiers":
        text = ", ".join(
            f"{c['name']}(w={c.get('weight', 1.0)}, pass_at={c.get('pass_at', 1.0)})" for c in reward["components"]
        )
        text = f"verifiers: {text}; scale={reward.get('scale_rewards')}"
    elif reward.get("kind") == "reward_model":
        text = f"reward model {reward['model']} (fingerprint {str(reward.get('fingerprint'))[:12]})"
    else:
        text = str(reward.get("definition"))
    ref = record.get("reference")
    ref_text = f"{ref['model']} ({ref['kind']}, KL coefficient {ref['kl_coefficient']})" if ref else "none"
    return [("reward", text), ("reference model", ref_text)]
