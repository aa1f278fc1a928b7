"""Verifier pass rates and reward-model scores of every model's test answers, base vs each model, with intervals.

The answers are the ones eval already generated (no second generation); the verifiers are the same definitions
GRPO optimises (`eval.verifiers`, default `train.grpo.rewards` for a grpo run), built and scored by
`train/preference/verifiers.py`; the reward model is a `method: reward` run's model/ folder (`eval.reward_model`,
default `train.ppo.reward_model` for a ppo run). Per model: pass rate with a 95% Wilson interval, mean combined
reward, per-component means; per model other than base: the paired bootstrap delta (eval/stats.py) of the pass
rate, the reward and the reward-model score. `gate_values` names them for eval.gates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domaintune.eval.items import Item
from domaintune.eval.stats import paired_bootstrap_delta
from domaintune.model.thinking import answer_text

if TYPE_CHECKING:
    from domaintune.config import ProjectConfig
    from domaintune.train.preference.config import VerifierSpec

_SCALAR = (str, int, float, bool, type(None))
# report key -> per-item list it is computed from, for the deltas and the gate names
_DELTAS = {"verifier_pass_rate": "passed", "verifier_reward": "rewards", "reward_model_score": "reward_model_scores"}


def configured(cfg: ProjectConfig) -> tuple[list[VerifierSpec], Path | None]:
    """(verifier specs, reward model folder) eval scores with: its own settings, else the run's method's."""
    ecfg, tcfg = cfg.eval, cfg.train
    specs = ecfg.verifiers if ecfg.verifiers is not None else (tcfg.grpo.rewards if tcfg.method == "grpo" else [])
    reward = ecfg.reward_model or (tcfg.ppo.reward_model if tcfg.method == "ppo" and tcfg.ppo else None)
    return list(specs), Path(reward) if reward else None


def _rows(items: Sequence[Item]) -> list[dict[str, Any]]:
    """What a verifier sees per item: the prompt, the reference answer and the row's scalar fields."""
    out = []
    for it in items:
        fields = {k: v for k, v in it.row.items() if isinstance(v, _SCALAR) and k not in ("prompt", "reference")}
        out.append({"prompt": it.prompt, **fields, "reference": answer_text(it.reference)})
    return out


def verifier_report(
    cfg: ProjectConfig, items: Sequence[Item], answers: dict[str, list[dict[str, Any]]], seed: int
) -> dict[str, Any] | None:
    """The report's `verifiers` section for the test set (None when neither verifiers nor a reward model is set)."""
    specs, reward_path = configured(cfg)
    if not specs and reward_path is None:
        return None
    rows = _rows(items)
    texts = {name: [answer_text(r["prediction"]) for r in model_rows] for name, model_rows in answers.items()}
    per_model: dict[str, dict[str, Any]] = {name: {} for name in texts}
    if specs:
        from domaintune.train.preference.scoring import score_answers
        from domaintune.train.preference.verifiers import build_verifiers

        verifiers = build_verifiers(specs)
        for name, model_texts in texts.items():  # scored once: an llm_judge component is a request per answer
            per_model[name] = score_answers(verifiers, rows, model_texts)
    if reward_path is not None:
        from domaintune.train.preference.reward import RewardModelScorer

        scorer = RewardModelScorer(reward_path)
        for name, model_texts in texts.items():
            scores = scorer([r["prompt"] for r in rows], model_texts)
            per_model[name]["reward_model_scores"] = scores
            per_model[name]["reward_model_score"] = sum(scores) / len(scores) if scores else None
    return {
        "set": "test",
        "n": len(rows),
        "verifiers": [s.model_dump(mode="json", exclude_defaults=True) for s in specs],
        "reward_model": str(reward_path) if reward_path else None,
        "models": per_model,
        "deltas": _deltas(per_model, seed),
    }


def _deltas(per_model: dict[str, dict[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Each model - base, paired bootstrap interval, for every per-item list both have."""
    base = per_model.get("base")
    if base is None:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for name, scores in per_model.items():
        if name == "base":
            continue
        out[name] = {
            key: paired_bootstrap_delta([float(x) for x in base[items]], [float(x) for x in scores[items]], seed=seed)
            for key, items in _DELTAS.items()
            if items in base and items in scores
        }
    return out


def gate_values(section: dict[str, Any] | None, main: str | None) -> dict[str, Any]:
    """Gate names: `<model>.verifier_pass_rate`, `<model>.verifier_reward_mean`, `<model>.reward_model_score`,
    `<model>.verifier.<component>_pass_rate`, and `[<model>.]verifier_pass_rate_delta[_ci_low|_ci_high]` (likewise
    `verifier_reward_delta`, `reward_model_score_delta`; un-prefixed for the tuned model)."""
    if not section:
        return {}
    values: dict[str, Any] = {}
    for model, scores in section["models"].items():
        if "pass_rate" in scores:
            values[f"{model}.verifier_pass_rate"] = scores["pass_rate"]
            values[f"{model}.verifier_reward_mean"] = scores["reward_mean"]
            for component, rate in scores["component_pass_rate"].items():
                values[f"{model}.verifier.{component}_pass_rate"] = rate
        if "reward_model_score" in scores:
            values[f"{model}.reward_model_score"] = scores["reward_model_score"]
    for model, deltas in section["deltas"].items():
        prefix = "" if model == main else f"{model}."
        for key, d in deltas.items():
            values[f"{prefix}{key}_delta"] = d["delta"]
            values[f"{prefix}{key}_delta_ci_low"] = d["ci_low"]
            values[f"{prefix}{key}_delta_ci_high"] = d["ci_high"]
    return values


def add_to_report(
    report: dict[str, Any],
    cfg: ProjectConfig,
    items: Sequence[Item],
    answers: dict[str, list[dict[str, Any]]],
    seed: int,
) -> None:
    """Eval's one call: report["verifiers"] (when configured) and its gate names merged into report["gate_values"]
    (call after gate_values is built, before the gates are evaluated)."""
    section = verifier_report(cfg, items, answers, seed)
    if section is None:
        return
    report["verifiers"] = section
    main = "tuned" if "tuned" in section["models"] else None
    report["gate_values"] = dict(sorted({**report["gate_values"], **gate_values(section, main)}.items()))
