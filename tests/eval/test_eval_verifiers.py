"""Eval's verifier pass rates and reward-model scores, base vs tuned, with intervals, and the gates on them."""

from __future__ import annotations

import json
import re

import pytest

from domaintune.config import config_from_dict
from domaintune.eval.gates import evaluate_gates
from domaintune.eval.items import Item
from domaintune.eval.verifiers import configured, gate_values, verifier_report

WINDOW = {"type": "regex", "name": "window", "pattern": r"\b30 days\b"}
SHORT = {"type": "length", "name": "short", "min_words": 1, "max_words": 12, "pass_at": 1.0}


def _cfg(eval_section: dict | None = None, **train) -> object:
    return config_from_dict(
        {"name": "t", "model": {"name_or_path": "tiny-random-llama"}, "eval": eval_section or {}, "train": train}
    )


def _items(n: int) -> list[Item]:
    return [
        Item(
            id=f"q{i}",
            prompt=[{"role": "user", "content": f"How long do I have to return order {i}?"}],
            reference="You have 30 days.",
            row={"id": f"q{i}", "order": i},
        )
        for i in range(n)
    ]


def _answers(base_hits: int, tuned_hits: int, n: int) -> dict[str, list[dict]]:
    def model(hits: int) -> list[dict]:
        return [{"prediction": "Returns are open for 30 days." if i < hits else "Ask the shop."} for i in range(n)]

    return {"base": model(base_hits), "tuned": model(tuned_hits)}


def test_pass_rates_deltas_and_gates():
    cfg = _cfg({"verifiers": [WINDOW, SHORT]})
    report = verifier_report(cfg, _items(40), _answers(8, 32, 40), seed=0)
    assert report is not None and report["n"] == 40
    base, tuned = report["models"]["base"], report["models"]["tuned"]
    assert base["pass_rate"] == pytest.approx(0.2) and tuned["pass_rate"] == pytest.approx(0.8)
    assert tuned["pass_rate_ci95"][0] < 0.8 < tuned["pass_rate_ci95"][1]
    assert tuned["component_pass_rate"] == {"window": pytest.approx(0.8), "short": 1.0}
    delta = report["deltas"]["tuned"]["verifier_pass_rate"]
    assert delta["delta"] == pytest.approx(0.6) and 0 < delta["ci_low"] < 0.6 < delta["ci_high"]
    assert report["deltas"]["tuned"]["verifier_reward"]["delta"] == pytest.approx(0.6)
    assert [v["name"] for v in report["verifiers"]] == ["window", "short"]

    values = gate_values(report, "tuned")
    assert values["verifier_pass_rate_delta"] == pytest.approx(0.6)
    assert values["base.verifier_pass_rate"] == pytest.approx(0.2)
    assert values["tuned.verifier.window_pass_rate"] == pytest.approx(0.8)
    gates = evaluate_gates(["verifier_pass_rate_delta_ci_low > 0", "tuned.verifier_pass_rate >= 0.9"], values)
    assert [r["passed"] for r in gates["results"]] == [True, False]

    # no gain: the interval straddles zero and the gate fails
    flat = gate_values(verifier_report(cfg, _items(40), _answers(20, 20, 40), seed=0), "tuned")
    assert flat["verifier_pass_rate_delta"] == 0
    assert not evaluate_gates(["verifier_pass_rate_delta_ci_low > 0"], flat)["passed"]


def test_what_is_scored_by_default():
    assert configured(_cfg())[0] == [] and verifier_report(_cfg(), _items(2), _answers(1, 1, 2), 0) is None
    grpo = _cfg(method="grpo", grpo={"rewards": [WINDOW]})
    assert [s.name for s in configured(grpo)[0]] == ["window"]  # a grpo run's own rewards
    assert configured(_cfg({"verifiers": []}, method="grpo", grpo={"rewards": [WINDOW]}))[0] == []
    assert configured(_cfg(method="lora", grpo={"rewards": [WINDOW]}))[0] == []  # not a grpo run: opt in
    ppo = _cfg(method="ppo", ppo={"reward_model": "rm"})
    assert configured(ppo)[1] is not None and configured(ppo)[1].name == "rm"


def test_reward_model_scores_each_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = tmp_path / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    report = verifier_report(_cfg({"reward_model": str(rm)}), _items(6), _answers(0, 6, 6), seed=0)
    assert report is not None and report["verifiers"] == []
    base, tuned = report["models"]["base"]["reward_model_scores"], report["models"]["tuned"]["reward_model_scores"]
    from domaintune.train.preference.reward import RewardModelScorer

    prompts = [it.prompt for it in _items(6)]
    assert base == pytest.approx(RewardModelScorer(rm)(prompts, ["Ask the shop."] * 6), abs=1e-5)
    assert tuned == pytest.approx(RewardModelScorer(rm)(prompts, ["Returns are open for 30 days."] * 6), abs=1e-5)
    assert base != pytest.approx(tuned)
    delta = report["deltas"]["tuned"]["reward_model_score"]
    assert delta["delta"] == pytest.approx(sum(tuned) / 6 - sum(base) / 6, abs=1e-6)
    assert report["models"]["tuned"]["reward_model_score"] == pytest.approx(sum(tuned) / 6)
    values = gate_values(report, "tuned")
    assert values["reward_model_score_delta"] == pytest.approx(delta["delta"])
    assert "verifier_pass_rate_delta" not in values
    from domaintune.eval.report import verifier_rows

    (row,) = verifier_rows(report)  # what the HTML report and the CLI show: the score alone, with its delta
    assert row["label"] == "reward model score" and row["deltas"]["tuned"] == delta
    assert row["values"]["base"] == pytest.approx(sum(base) / 6)


def test_run_eval_reports_verifiers_and_gates_on_them(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from domaintune.eval.runner import run_eval
    from domaintune.layout import RunLayout
    from domaintune.utils.io import read_jsonl

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    rows = [
        {
            "id": f"t{i}",
            "messages": [
                {"role": "user", "content": f"How long is the return window for order {i}?"},
                {"role": "assistant", "content": "30 days."},
            ],
        }
        for i in range(5)
    ]
    (run / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    torch.manual_seed(1)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(run / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(run / "model")
    cfg = config_from_dict(
        {
            "name": "t",
            "output_dir": str(run),
            "model": {"name_or_path": "tiny-random-llama"},
            "eval": {
                "decoding": {"max_new_tokens": 6, "batch_size": 5},
                "metrics": ["chrf"],
                "primary_metric": "chrf",
                "engine": "transformers",
                "robustness": {"enabled": False},
                "bootstrap_samples": 100,
                "verifiers": [{"type": "regex", "name": "has_a", "pattern": "a"}],
                "gates": ["verifier_pass_rate_delta_ci_high >= -1", "base.verifier_pass_rate >= 0"],
            },
        }
    )
    report = run_eval(cfg, RunLayout(run))
    section = report["verifiers"]
    assert section["n"] == 5 and set(section["models"]) == {"base", "tuned"}
    items = list(read_jsonl(run / "eval" / "items.jsonl"))
    for model in ("base", "tuned"):  # the pass rate is the regex on the very answers eval scored
        answers = [it["answers"][model] for it in items if it.get("set", "test") == "test"][:5]
        expected = sum(bool(re.search("a", a, re.I)) for a in answers) / 5
        assert section["models"][model]["pass_rate"] == pytest.approx(expected)
    assert report["gate_values"]["base.verifier_pass_rate"] == section["models"]["base"]["pass_rate"]
    assert "verifier_pass_rate_delta_ci_low" in report["gate_values"]
    assert report["gates"]["passed"], report["gates"]
    assert json.loads((run / "eval" / "report.json").read_text())["verifiers"]["n"] == 5

    # the HTML report and the CLI show the section with its numbers; hand-made answers give known ones
    from domaintune.cli.eval import _print_summary
    from domaintune.eval.report import render_html

    window = {**WINDOW, "applies_if": r"order (1?[0-9])\?"}  # applies to orders 0-19 of 40
    hand = verifier_report(_cfg({"verifiers": [window, SHORT]}), _items(40), _answers(8, 32, 40), seed=0)
    assert hand is not None
    report["verifiers"] = hand
    base_ci, tuned_ci = hand["models"]["base"]["pass_rate_ci95"], hand["models"]["tuned"]["pass_rate_ci95"]
    delta = hand["deltas"]["tuned"]["verifier_pass_rate"]
    assert delta["delta"] == pytest.approx(0.3) and delta["ci_low"] > 0  # base: 8 of 20 where it applies
    html = " ".join(render_html(report).split())
    section = html.split("<h2>Domain verifiers (test set, 40 items)</h2>")[1].split("<h2>")[0]
    assert "verifiers: window (regex), short (length)" in section
    pass_row = (
        f"<td>pass rate (all verifiers)</td><td>0.7 [{base_ci[0]:.4g}, {base_ci[1]:.4g}]</td>"
        f"<td>1 [{tuned_ci[0]:.4g}, {tuned_ci[1]:.4g}]</td>"
        f'<td class="good">0.3 [{delta["ci_low"]:.4g}, {delta["ci_high"]:.4g}]</td>'
    )
    assert pass_row in section
    assert "<td>window pass rate where it applies (20 items)</td><td>0.4</td><td>1</td>" in section
    assert "<td>short pass rate</td><td>1</td><td>1</td>" in section
    reward = hand["deltas"]["tuned"]["verifier_reward"]
    assert f"<td>mean reward</td><td>{hand['models']['base']['reward_mean']:.4g}</td>" in section
    assert f"{reward['delta']:.4g} [{reward['ci_low']:.4g}, {reward['ci_high']:.4g}]</td>" in section
    from domaintune.cli.common import console

    # The table's cells unwrapped: the shared console took its width from COLUMNS at import (CI runs at 40).
    monkeypatch.setattr(console, "_width", 200)
    _print_summary(report, RunLayout(run))
    out = " ".join(capsys.readouterr().err.split())
    assert "domain verifiers (test set, 40 items)" in out
    cells = (
        f"pass rate (all verifiers) │ 0.7 [{base_ci[0]:.4g}, {base_ci[1]:.4g}] │ 1 [{tuned_ci[0]:.4g}, {tuned_ci[1]:.4g}]"
        f" │ +0.3 [{delta['ci_low']:+.3g}, {delta['ci_high']:+.3g}] │"
    )
    assert cells in out and "window pass rate where it applies (20 items) │ 0.4 │ 1 │" in out

    del report["verifiers"]  # no verifiers ran: no section, no table
    assert "Domain verifiers" not in render_html(report)
    _print_summary(report, RunLayout(run))
    assert "domain verifiers" not in capsys.readouterr().err
