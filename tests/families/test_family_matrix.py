"""The family matrix: tiny random Llama, Qwen2, Qwen3, Gemma 3, Mistral and Phi-3 models (real tokenizers and
chat templates) through data -> train -> eval -> export (merge) -> serve; and every adapter method through the
same loop on one family, the prompt-learning ones (prefix, prompt, ptuning) evaluated, exported and served
unmerged. Tiny on purpose: 2 train steps, 2 eval items, 2 export rows, a few generated tokens."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml
from tests.llamacpp.families import FAMILIES

from domaintune.config import load_config
from domaintune.workflow.pipeline import run_pipeline

TOPICS = ["fever", "cough", "insulin", "kidney", "asthma", "allergy", "migraine", "vitamin", "sleep", "rash"]


def _rows(n: int) -> list[dict]:
    return [
        {
            "instruction": f"Patient {i} asks about {TOPICS[i % 10]} and {TOPICS[(i * 3 + 1) % 10]}: what now?",
            "input": "",
            "output": f"For {TOPICS[i % 10]}, case {i} needs rest, fluids and a visit in {i % 7 + 1} days.",
        }
        for i in range(n)
    ]


def project(tmp_path: Path, model_dir: Path, method: str = "lora", **overrides) -> Path:
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(40)), encoding="utf-8")
    config: dict = {
        "name": "fam",
        "output_dir": "run",
        "model": {"name_or_path": str(model_dir)},
        "data": {
            "sources": [{"path": "qa.jsonl", "reader": "alpaca"}],
            "dedup": {"near": False},
            "filters": {"outlier_sigma": None},
            "decontaminate": {"enabled": False},
        },
        "train": {
            "method": method,
            "max_steps": 2,
            "eval_steps": 2,
            "save_steps": 2,
            "batch_size": 2,
            "max_length": 64,
            "precision": "fp32",
            "logging_steps": 1,
            "max_val_samples": 2,
            "prompt_learning": {"num_virtual_tokens": 4},
        },
        "eval": {
            "engine": "transformers",
            "base": False,
            "max_items": 2,
            "max_general_items": 1,
            "decoding": {"max_new_tokens": 4, "batch_size": 2},
            "robustness": {"enabled": False},
            "bootstrap_samples": 100,
            "gates": [],
        },
        "export": {
            "gguf": [],
            "int8": False,
            "eval_rows": 2,
            "eval_items": 0,
            "speed_prompts": 1,
            "speed_new_tokens": 2,
        },
        "serve": {"engine": "transformers", "default_max_tokens": 3, "key_hash_iterations": 1000, "batch_wait_ms": 1},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def run_loop(config: Path, stages: tuple[str, ...] = ("data", "train", "eval")) -> Path:
    """Run the stages in the project's run folder; returns the run folder."""
    result = run_pipeline(load_config(config), stages=list(stages))
    assert {o.name: o.status for o in result.outcomes} == dict.fromkeys(stages, "ran")
    run = config.parent / "run"
    if "eval" in stages:
        report = json.loads((run / "eval" / "report.json").read_text(encoding="utf-8"))
        assert "tuned" in json.dumps(report)
    return run


def merged_logits_match(run: Path) -> None:
    """The trained model merged (an adapter that can be) gives the logits of base + adapter."""
    import torch

    from domaintune.model.loader import load_trained

    merged, tokenizer = load_trained(run / "model", merge=True)
    unmerged, _ = load_trained(run / "model", merge=False)
    ids = torch.tensor([tokenizer("fever and cough", add_special_tokens=False).input_ids])
    with torch.inference_mode():
        diff = (merged(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max()
    assert float(diff) < 1e-3


def serve_one_chat(config: Path) -> dict:
    """Serve the run's trained model (an adapter, applied unmerged on its base) and ask it one question."""
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    cfg = load_config(config)
    state = build_state(cfg)
    key = state.store.create_key("t")[1]
    with BackgroundServer(state) as srv:
        reply = httpx.post(
            srv.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "fam", "messages": [{"role": "user", "content": "fever?"}], "max_tokens": 3},
            timeout=120,
        )
    assert reply.status_code == 200, reply.text
    return reply.json()


# Every family, every stage and every method in the default suite (~2 min on 2 cores; Qwen's 151k-token
# vocabularies take ~12 s a test).
@pytest.mark.parametrize("family", FAMILIES)
def test_family_lora_through_data_train_eval_merge(family, family_model, tmp_path):
    run = run_loop(project(tmp_path, family_model(family)))
    merged_logits_match(run)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lora_export_and_serve(family, family_model, tmp_path):
    config = project(tmp_path, family_model(family))
    run = run_loop(config, ("data", "train", "eval", "export"))
    assert (run / "export" / "merged" / "config.json").is_file()
    answer = serve_one_chat(config)
    assert answer["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    "method",
    ["prefix", "prompt", "ptuning"],
)
def test_prompt_learning_method_is_evaluated_and_served_unmerged(method, family_model, tmp_path):
    config = project(tmp_path, family_model("phi3"), method)
    run = run_loop(config)
    assert json.loads((run / "model" / "adapter_config.json").read_text())["peft_type"] != "LORA"
    merged_logits_match(run)  # merge=True leaves it unmerged: same model
    answer = serve_one_chat(config)
    assert answer["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("method", ["dora", "ia3", "full", "freeze"])
def test_other_methods_through_the_loop(method, family_model, tmp_path):
    config = project(tmp_path, family_model("gemma3"), method, **{"train.freeze": {"trainable_layers": 1}})
    run_loop(config, ("data", "train", "eval", "export"))
    assert serve_one_chat(config)["choices"][0]["message"]["role"] == "assistant"


def test_prompt_learning_export_is_the_adapter_with_a_note(family_model, tmp_path):
    run = run_loop(project(tmp_path, family_model("llama"), "prefix"), ("data", "train", "export"))
    manifest = json.loads((run / "export" / "manifest.json").read_text(encoding="utf-8"))
    assert "cannot be merged" in json.dumps(manifest)
    assert not (run / "export" / "merged").exists()
    assert (run / "export" / "adapter" / "adapter_config.json").is_file()
