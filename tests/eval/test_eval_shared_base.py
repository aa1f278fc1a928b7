"""The base rows shared by several runs' evals (a sweep's `shared_eval/`): reused only under the same settings."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.eval.models import EvalModel
from domaintune.eval.runner import run_eval
from domaintune.layout import RunLayout
from domaintune.utils.io import read_jsonl


def _run(folder: Path, tiny_model_dir: Path, adapter_seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (folder / "data").mkdir(parents=True)
    for name, n in (("test", 4), ("general", 2)):
        rows = [
            {"id": f"{name}{i}", "messages": [{"role": "user", "content": f"{name} question {i}?"},
                                              {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(n)
        ]  # fmt: skip
        (folder / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    torch.manual_seed(adapter_seed)  # each run's "tuned" model: a random LoRA adapter of its own
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    peft_model.save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder / "model")
    return folder


def _cfg(run: Path, max_new_tokens: int = 4, tuned: bool = True):
    return config_from_dict(
        {
            "name": "t",
            "output_dir": str(run),
            "model": {"name_or_path": "tiny-random-llama"},
            "eval": {
                "decoding": {"max_new_tokens": max_new_tokens, "batch_size": 4},
                "robustness": {"enabled": False},
                "bootstrap_samples": 100,
                "gates": [],
                "engine": "transformers",
                "tuned": tuned,
            },
        }
    )


def _untimed(metrics: dict) -> dict:
    """A model's metrics without the timings (a cached answer keeps the latency of the run that made it)."""
    return {s: {k: v for k, v in m.items() if "latency" not in k and "per_s" not in k} for s, m in metrics.items()}


@pytest.fixture
def calls(monkeypatch):
    """(model name -> prompts generated, model name -> references scored) while the test runs."""
    generated: Counter[str] = Counter()
    scored: Counter[str] = Counter()
    generate, reference_nll = EvalModel.generate, EvalModel.reference_nll

    def counting_generate(self, prompts, *args, **kwargs):
        generated[self.name] += len(prompts)
        return generate(self, prompts, *args, **kwargs)

    def counting_nll(self, prompts, *args, **kwargs):
        scored[self.name] += len(prompts)
        return reference_nll(self, prompts, *args, **kwargs)

    monkeypatch.setattr(EvalModel, "generate", counting_generate)
    monkeypatch.setattr(EvalModel, "reference_nll", counting_nll)
    return generated, scored


def test_a_second_run_reads_the_shared_base_rows_and_never_the_tuned_ones(tmp_path, tiny_model_dir, calls):
    generated, scored = calls
    shared = tmp_path / "shared_eval"
    first = run_eval(_cfg(_run(tmp_path / "a", tiny_model_dir, 1)), RunLayout(tmp_path / "a"), shared_base=shared)
    assert generated == {"base": 6, "tuned": 6} and scored == {"base": 6, "tuned": 6}
    assert first["cache"]["shared_base_rows"] == 0
    [folder] = list(shared.iterdir())  # one folder: the digest of the settings
    answers = list(read_jsonl(folder / "predictions.jsonl"))
    assert len(answers) == 6 and {r["model"] for r in answers} == {"base"}  # the tuned model's rows stay out
    assert {r["model"] for r in read_jsonl(folder / "perplexity.jsonl")} == {"base"}

    generated.clear(), scored.clear()
    b = _run(tmp_path / "b", tiny_model_dir, 2)
    second = run_eval(_cfg(b), RunLayout(b), shared_base=shared)
    assert generated == {"tuned": 6} and scored == {"tuned": 6}  # the base model answered nothing
    assert second["cache"]["shared_base_rows"] == 12 and second["cache"]["answers_generated"] == 6
    for set_name in ("test", "general"):
        assert second["metrics"][set_name]["base"] == first["metrics"][set_name]["base"]
        assert second["metrics"][set_name]["tuned"] != first["metrics"][set_name]["base"]
    # the same report as without the shared rows (timings aside)
    c = _run(tmp_path / "c", tiny_model_dir, 2)
    alone = run_eval(_cfg(c), RunLayout(c))
    assert _untimed(alone["metrics"]["test"]) == _untimed(second["metrics"]["test"])
    assert _untimed({s: d["tuned"] for s, d in alone["deltas"].items()}) == _untimed(
        {s: d["tuned"] for s, d in second["deltas"].items()}
    )

    generated.clear(), scored.clear()
    d = tmp_path / "d"
    changed = run_eval(
        _cfg(d, max_new_tokens=3, tuned=False), RunLayout(_run(d, tiny_model_dir, 2)), shared_base=shared
    )
    assert generated == {"base": 6}  # other decoding: the base model answers again
    assert changed["cache"]["shared_base_rows"] == 0 and len(list(shared.iterdir())) == 2
