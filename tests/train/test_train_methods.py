"""Every train.method trains a few steps on the tiny model, saves model/, and that folder reloads and generates."""

from __future__ import annotations

import json

import pytest
import torch

from domaintune.layout import RunLayout
from domaintune.model.loader import end_of_turn_token_ids, load_trained
from domaintune.train.runner import run_train
from train_helpers import make_run_dir, tiny_config


def _reload_and_generate(model_dir):
    model, tokenizer = load_trained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=end_of_turn_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    assert out.shape[1] > inputs["input_ids"].shape[1]
    return model


ADAPTER_METHODS = {
    "lora": "LORA",
    "dora": "LORA",
    "prefix": "PREFIX_TUNING",
    "prompt": "PROMPT_TUNING",
    "ptuning": "P_TUNING",
    "ia3": "IA3",
}


@pytest.mark.parametrize("method", sorted(ADAPTER_METHODS))
def test_adapter_methods_train_save_reload_generate(tmp_path, method):
    run = make_run_dir(tmp_path)
    metrics = run_train(tiny_config(method=method), RunLayout(run))
    adapter_cfg = json.loads((run / "model" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == ADAPTER_METHODS[method]
    assert adapter_cfg.get("use_dora", False) == (method == "dora")
    assert adapter_cfg["base_model_name_or_path"] == "tiny-random-llama"
    assert metrics["steps"] == 2 and metrics["model_kind"] == "adapter"
    assert 0 < metrics["params"]["trainable_params"] < metrics["params"]["total_params"] / 2
    assert metrics["step0_val_loss"] is not None and metrics["final_val_loss"] is not None
    _reload_and_generate(run / "model")


def test_full_finetune_changes_every_weight_and_reloads(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    run = make_run_dir(tmp_path)
    metrics = run_train(tiny_config(method="full"), RunLayout(run))
    assert metrics["model_kind"] == "full"
    assert metrics["params"]["trainable_params"] == metrics["params"]["total_params"]
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "model" / "model.safetensors")
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    _reload_and_generate(run / "model")


def test_freeze_trains_only_last_layer_and_named_modules(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    run = make_run_dir(tmp_path)
    run_train(tiny_config(method="freeze", freeze={"trainable_layers": 1, "modules": ["norm"]}), RunLayout(run))
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "model" / "model.safetensors")
    assert torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])
    _reload_and_generate(run / "model")


def test_distill_into_a_smaller_student(tmp_path, tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    student_dir = tmp_path / "student"
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 1
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(student_dir)

    run = make_run_dir(tmp_path / "run")
    cfg = tiny_config(method="distill", distill={"teacher": "tiny-random-llama", "alpha": 0.7, "temperature": 2.0})
    cfg.model.name_or_path = str(student_dir)
    metrics = run_train(cfg, RunLayout(run))
    assert metrics["model_kind"] == "full"
    assert metrics["params"]["total_params"] < 3_300_000  # 1-layer student, smaller than the 2-layer teacher
    model = _reload_and_generate(run / "model")
    assert model.config.num_hidden_layers == 1


def test_distill_loss_mixes_kl_and_ce(tiny_model_dir):
    """alpha=0 is plain CE; alpha=1 with the teacher equal to the student gives zero KL."""
    from transformers import AutoModelForCausalLM

    from domaintune.train.distill import DistillTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    inputs = {"input_ids": ids, "labels": labels}
    trainer = DistillTrainer.__new__(DistillTrainer)
    trainer.teacher, trainer.temperature = teacher, 2.0
    trainer.alpha = 1.0
    kl_only = trainer.compute_loss(model, inputs)
    assert kl_only.item() == pytest.approx(0.0, abs=1e-5)
    trainer.alpha = 0.0
    ce = trainer.compute_loss(model, inputs)
    assert ce.item() == pytest.approx(model(**inputs).loss.item(), rel=1e-5)


def test_dpo_on_lora_adapter(tmp_path):
    run = make_run_dir(tmp_path)
    pairs = [
        {"prompt": f"What is {i} plus 1?", "chosen": f"{i} plus 1 is {i + 1}.", "rejected": "No idea."}
        for i in range(20)
    ]
    (run / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    metrics = run_train(
        tiny_config(method="dpo", dpo={"adapter": "lora", "beta": 0.1, "path": str(run / "pairs.jsonl")}),
        RunLayout(run),
    )
    assert metrics["method"] == "dpo" and metrics["trained_as"] == "lora"
    assert metrics["step0_val_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference at step 0
    assert metrics["data"]["train"]["rows"] == 18 and metrics["data"]["val"]["rows"] == 2
    _reload_and_generate(run / "model")


def test_dpo_trains_on_the_feedback_export_without_a_path(tmp_path):
    """`domaintune feedback export` writes feedback/preference.jsonl; method dpo reads it by default."""
    from domaintune.serve.feedback import export_feedback
    from domaintune.serve.store import Store, default_store_url

    run = make_run_dir(tmp_path)
    cfg = tiny_config(method="dpo", dpo={"adapter": "lora"})
    store = Store(default_store_url(run), key_hash_iterations=1000)
    topics = ["sore throat", "a sprained ankle", "heartburn", "a tension headache", "seasonal hay fever", "dry eyes"]
    for i, topic in enumerate(topics):
        store.log_request(
            id=f"req-{i}",
            endpoint="chat",
            model="tiny",
            served="tiny",
            version="v1",
            prompt=[{"role": "user", "content": f"How should I look after {topic} at home?"}],
            response="I cannot say.",
            status=200,
            outcome="ok",
        )
        store.add_feedback(
            f"req-{i}", None, -1, f"For {topic}: rest, fluids, and see a doctor if it lasts a week.", None
        )
    store.engine.dispose()
    report = export_feedback(cfg, run)
    assert report["preference_rows"] == len(topics)
    assert report["files"]["preference"] == str(run / "feedback" / "preference.jsonl")

    metrics = run_train(cfg, RunLayout(run))
    assert metrics["data"]["train_file"] == str(run / "feedback" / "preference.jsonl")
    assert metrics["data"]["train"]["rows"] == 5 and metrics["data"]["val"]["rows"] == 1
    assert metrics["step0_val_loss"] == pytest.approx(0.6931, abs=1e-3)


def test_dpo_without_pairs_names_the_export_command(tmp_path):
    from domaintune.errors import UserError

    run = make_run_dir(tmp_path)
    with pytest.raises(UserError, match=r"feedback/preference\.jsonl: preference file not found.*feedback export"):
        run_train(tiny_config(method="dpo"), RunLayout(run))


def test_init_from_continues_an_existing_adapter(tmp_path):
    first = make_run_dir(tmp_path / "first")
    run_train(tiny_config(method="lora", lora={"r": 4}), RunLayout(first))
    second = make_run_dir(tmp_path / "second", seed=1)
    metrics = run_train(tiny_config(method="lora", init_from=str(first / "model")), RunLayout(second))
    assert metrics["init_from"] == str(first / "model")
    # The continued adapter keeps the first round's rank (its own settings), not the default r=8.
    assert json.loads((second / "model" / "adapter_config.json").read_text())["r"] == 4
    # And starts from the first round's weights: its step-0 val loss equals the first model's val loss on that data.
    from safetensors.torch import load_file

    a = load_file(first / "model" / "adapter_model.safetensors")
    b = load_file(second / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_init_from_registry_alias(tmp_path):
    from domaintune.config import config_from_dict
    from domaintune.registry import register_run, registry_from_config

    def cfg_for(run, **train):
        base = tiny_config(**train).model_dump(mode="json", exclude={"config_path", "output_dir"})
        return config_from_dict({**base, "output_dir": str(run)})

    first = make_run_dir(tmp_path / "first")
    cfg1 = cfg_for(first, lora={"r": 4})
    run_train(cfg1, RunLayout(first))
    version = register_run(cfg1, RunLayout(first))
    registry_from_config(cfg1).promote("t", version, alias="production", force=True)

    second = make_run_dir(tmp_path / "second", seed=1)
    cfg2 = cfg_for(second, init_from="registry://t@production")
    metrics = run_train(cfg2, RunLayout(second))
    assert "registry" in metrics["init_from"]  # the verified copy in the registry's artefact store
    assert json.loads((second / "model" / "adapter_config.json").read_text())["r"] == 4
    _reload_and_generate(second / "model")


def test_bf16_packing_and_gradient_checkpointing_together(tmp_path):
    run = make_run_dir(tmp_path)
    metrics = run_train(tiny_config(precision="bf16", packing=True, gradient_checkpointing=True), RunLayout(run))
    assert metrics["precision"] == "bf16" and metrics["config"]["packing"] is True
    assert torch.isfinite(torch.tensor([metrics["final_train_loss"], metrics["final_val_loss"]])).all()
    _reload_and_generate(run / "model")
