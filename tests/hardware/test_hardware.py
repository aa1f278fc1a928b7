"""doctor and estimate: the parameter counts the estimate uses must agree with what peft actually trains."""

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.hardware.estimate import (
    RunShape,
    estimate_all,
    memory_breakdown,
    model_shape_from_config,
    trainable_params,
)


@pytest.fixture(scope="module")
def tiny_shape(tiny_model_dir):
    return model_shape_from_config(tiny_model_dir)


def test_param_count_from_config_matches_real_model(tiny_model_dir, tiny_shape):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tiny_shape.params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("method,use_dora", [("lora", False), ("dora", True)])
def test_lora_trainable_count_matches_peft(tiny_model_dir, tiny_shape, method, use_dora):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", use_dora=use_dora))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable_params(method, tiny_shape, RunShape(lora_r=8)) == trainable


def test_memory_orders_methods_sensibly(tiny_shape):
    run = RunShape(seq_len=256, batch_size=4, precision="bf16")
    full = sum(memory_breakdown("full", tiny_shape, run, "gpu").values())
    lora = sum(memory_breakdown("lora", tiny_shape, run, "gpu").values())
    qlora = sum(memory_breakdown("qlora", tiny_shape, run, "gpu").values())
    assert full > lora > qlora
    checkpointed = memory_breakdown(
        "lora", tiny_shape, RunShape(seq_len=256, batch_size=4, gradient_checkpointing=True), "gpu"
    )
    plain = memory_breakdown("lora", tiny_shape, RunShape(seq_len=256, batch_size=4), "gpu")
    assert checkpointed["activations"] < plain["activations"]


def test_run_time_scales_with_tokens(tiny_shape):
    small = estimate_all(tiny_shape, RunShape(total_tokens=10_000), "gpu", 100e12, ["lora"])[0]
    large = estimate_all(tiny_shape, RunShape(total_tokens=20_000), "gpu", 100e12, ["lora"])[0]
    assert large.run_seconds == pytest.approx(2 * small.run_seconds)


def test_doctor_runs_and_lists_capabilities():
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for text in ("QLoRA", "vLLM", "bundled model", "torch", "GGUF cache", "DOMAINTUNE_GGUF_CACHE_MAX_GB"):
        assert text in result.output


def test_estimate_predicts_the_whole_train_stage_from_the_data(tmp_path, monkeypatch):
    """Tokens per row come from the data; the stage adds the validation forwards and the fixed cost."""
    import json as _json

    from domaintune.config import config_from_dict
    from domaintune.hardware import plan as plan_module
    from domaintune.hardware.probe import Hardware

    data = tmp_path / "data"
    data.mkdir()
    row = _json.dumps({"messages": [{"role": "user", "content": "q " * 20}, {"role": "assistant", "content": "a"}]})
    (data / "train.jsonl").write_text((row + "\n") * 10)
    (data / "val.jsonl").write_text((row + "\n") * 4)
    monkeypatch.setattr(plan_module, "detect_hardware", lambda: Hardware("cpu", 2, 8.0, set()))
    monkeypatch.setattr(plan_module, "measure_cpu_flops", lambda precision: 1e11)
    train = {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "batch_size": 2, "max_length": 512}
    cfg = config_from_dict(
        {"name": "t", "output_dir": str(tmp_path), "model": {"name_or_path": "tiny-random-llama"}, "train": train}
    )
    result = plan_module.plan_estimates(cfg, gpus=[])
    target = result.targets[0]
    lora = next(e for e in target.estimates if e.method == "lora")
    assert "x ~" in result.header and lora.run_seconds is not None
    assert lora.run_seconds < 4 * 2 * 512 / lora.tokens_per_s  # rows are far shorter than max_length
    assert result.eval_tokens > 0  # 3 evaluations (steps 0, 2, 4) of 4 val rows
    stage = plan_module.stage_seconds(result, target, lora)
    assert stage is not None and stage > lora.run_seconds + plan_module.STAGE_FIXED_SECONDS
